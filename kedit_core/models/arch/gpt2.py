from kedit_core.models.arch.base import ArchSpec, register_arch

GPT2 = register_arch(ArchSpec(
    family="gpt2", architectures=("GPT2LMHeadModel",),
    blocks="transformer.h", mlp_in="mlp.c_fc", mlp_out="mlp.c_proj", attn_out="attn.c_proj",
    final_norm="transformer.ln_f", unembed="lm_head", embed="transformer.wte",
    weight_layout="conv1d"))
