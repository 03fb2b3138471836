"""Training recipes: CoT-SFT (sft.py) and GRPO-family RL with MR-SP (rl.py)."""

# LoRA on every linear layer of the language model (attention and MLP), shared by SFT and RL.
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
