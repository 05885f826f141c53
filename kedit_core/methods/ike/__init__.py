from kedit_core.methods.ike.method import IKE, IKEConfig, DemoPool, ike_prompt

__all__ = ["IKE", "IKEConfig", "DemoPool", "ike_prompt"]
