"""`dynamic-llava bench`: Dynamic-LLaVA vs the stock transformers LLaVA on the same weights. `run` (the benchmark),
`accounting` (FLOP and KV-byte counting), `counting` (aten ops, host syncs and in-place writes per decode step),
`memory` (peak RSS / accelerator memory, footprints, the largest batch in a budget) and `stock` (the stock model on
the same weights).
"""
