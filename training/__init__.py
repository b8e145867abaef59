"""Training the predictors: `trainer` (`train()` under the stock transformers Trainer, `GumbelTemperatureCallback`),
`data` (LLaVA conversation JSON) and `calibration` (the output-text threshold shift).

The modules are imported where they are used; this file imports none of them (the Trainer is slow to import).
"""
