from kedit_core.models.arch.base import ArchSpec, register_arch

# Llama, Mistral and Qwen2 share module names; the gated MLP's "in" site is up_proj.
LLAMA = register_arch(ArchSpec(
    family="llama",
    architectures=("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"),
    blocks="model.layers", mlp_in="mlp.up_proj", mlp_out="mlp.down_proj",
    attn_out="self_attn.o_proj", final_norm="model.norm", unembed="lm_head",
    embed="model.embed_tokens"))
