from kedit_core.models.arch.base import ArchSpec, register_arch

GPTJ = register_arch(ArchSpec(
    family="gptj", architectures=("GPTJForCausalLM",),
    blocks="transformer.h", mlp_in="mlp.fc_in", mlp_out="mlp.fc_out", attn_out="attn.out_proj",
    final_norm="transformer.ln_f", unembed="lm_head", embed="transformer.wte"))
