from kedit_core.models.arch.base import ArchSpec, register_arch

# Gemma 3 normalises the MLP output (post_feedforward_layernorm) before the residual add.
GEMMA3 = register_arch(ArchSpec(
    family="gemma3", architectures=("Gemma3ForCausalLM",),
    blocks="model.layers", mlp_in="mlp.up_proj", mlp_out="mlp.down_proj",
    attn_out="self_attn.o_proj", final_norm="model.norm", unembed="lm_head",
    embed="model.embed_tokens", mlp_post_norm="post_feedforward_layernorm"))
