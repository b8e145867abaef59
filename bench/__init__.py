"""`dynamic-llava bench`: Dynamic-LLaVA vs the stock transformers LLaVA on the same weights. `run` (the benchmark),
`accounting` (FLOP and KV-byte counting) and `stock` (the stock model on the same weights).
"""
