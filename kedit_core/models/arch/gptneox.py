from kedit_core.models.arch.base import ArchSpec, register_arch

GPTNEOX = register_arch(ArchSpec(
    family="gptneox", architectures=("GPTNeoXForCausalLM",),
    blocks="gpt_neox.layers", mlp_in="mlp.dense_h_to_4h", mlp_out="mlp.dense_4h_to_h",
    attn_out="attention.dense", final_norm="gpt_neox.final_layer_norm", unembed="lm_head",  # "embed_out" before transformers 5
    embed="gpt_neox.embed_in"))
