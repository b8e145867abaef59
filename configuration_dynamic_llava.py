"""Configuration of Dynamic-LLaVA (ICLR 2025): a LLaVA config plus the sparsification fields.

Every field of the stock `LlavaConfig` keeps its meaning. The sparsification fields are flat attributes so they
show up in `config.json` and can be set from `from_pretrained(..., vision_keep_rate=0.3)`.
"""

from transformers import LlavaConfig

__all__ = ["DynamicLlavaConfig"]


class DynamicLlavaConfig(LlavaConfig):
    r"""
    Configuration of [`DynamicLlavaForConditionalGeneration`].

    Args (besides those of `LlavaConfig`):
        sparse_layer (`int`, defaults to 2):
            Index `l` of the first sparse decoder layer. Layers `0..l-1` see every token; the predictors score the
            hidden states entering layer `l`; layers `l..L-1` see, and cache, only the kept tokens.
            Must lie in `1..num_hidden_layers-1`.
        vision_keep_rate (`float`, defaults to 0.2):
            Fraction of each image's tokens kept at prefill: `k = int(num_image_tokens * vision_keep_rate)`
            (576 tokens x 0.2 -> 115).
        output_text_keep_rate (`float`, defaults to 0.5):
            Training target of the output-text predictor's keep ratio. At inference the predictor's own threshold
            decides (keep iff `logit[0] > logit[1]`); there is no budget.
        output_text_len_for_training (`int`, defaults to 50):
            Answers shorter than this are not sparsified during training.
        use_vision_predictor (`bool`, defaults to True):
            Prune image tokens at prefill with the image predictor.
        use_output_text_predictor (`bool`, defaults to True):
            Decide, per generated token, whether its keys/values enter the sparse layers' cache.
            With both `use_*` False, sparsification is off and the model computes exactly what stock LLaVA does.
        predictor_d_model (`int`, defaults to 512): width of both predictors.
        predictor_nhead (`int`, defaults to 8): attention heads of the image predictor's transformer blocks.
        predictor_dim_feedforward (`int`, defaults to 2048): MLP width of those blocks.
        predictor_num_layers (`int`, defaults to 2): number of those blocks.
        mask_loss_weight (`float`, defaults to 100): weight of the keep-budget loss during training.
    """

    model_type = "dynamic_llava"

    def __init__(
        self,
        sparse_layer=2,
        vision_keep_rate=0.2,
        output_text_keep_rate=0.5,
        output_text_len_for_training=50,
        use_vision_predictor=True,
        use_output_text_predictor=True,
        predictor_d_model=512,
        predictor_nhead=8,
        predictor_dim_feedforward=2048,
        predictor_num_layers=2,
        mask_loss_weight=100.0,
        **kwargs,
    ):
        self.sparse_layer = sparse_layer
        self.vision_keep_rate = vision_keep_rate
        self.output_text_keep_rate = output_text_keep_rate
        self.output_text_len_for_training = output_text_len_for_training
        self.use_vision_predictor = use_vision_predictor
        self.use_output_text_predictor = use_output_text_predictor
        self.predictor_d_model = predictor_d_model
        self.predictor_nhead = predictor_nhead
        self.predictor_dim_feedforward = predictor_dim_feedforward
        self.predictor_num_layers = predictor_num_layers
        self.mask_loss_weight = mask_loss_weight
        super().__init__(**kwargs)
        self.validate_sparsity()

    @property
    def sparsification_enabled(self) -> bool:
        """False when both predictors are off: the model then computes exactly what stock LLaVA does."""
        return bool(self.use_vision_predictor or self.use_output_text_predictor)

    def validate_sparsity(self):
        """Raise a `ValueError` naming the field and the fix when a sparsification field is out of range."""
        num_layers = getattr(self.text_config, "num_hidden_layers", None)

        def fail(field, problem, fix):
            raise ValueError(f"DynamicLlavaConfig.{field} {problem}. {fix}")

        def check_int(field, value, low):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                fail(field, f"must be an integer >= {low}, got {value!r}", f"Set {field} to such an integer.")

        check_int("sparse_layer", self.sparse_layer, 1)
        if num_layers is not None and not (1 <= self.sparse_layer <= num_layers - 1):
            fail(
                "sparse_layer",
                f"is {self.sparse_layer}, outside 1..{num_layers - 1} (the text model has {num_layers} layers)",
                "At least one dense layer must come before it and one sparse layer from it on.",
            )
        for field in ("vision_keep_rate", "output_text_keep_rate"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 < value <= 1.0):
                fail(field, f"is {value!r}, outside (0, 1]", "Use a fraction such as 0.2.")
        for field in ("use_vision_predictor", "use_output_text_predictor"):
            if not isinstance(getattr(self, field), bool):
                fail(field, f"must be True or False, got {getattr(self, field)!r}", "Pass a bool.")
        check_int("output_text_len_for_training", self.output_text_len_for_training, 0)
        for field in ("predictor_d_model", "predictor_nhead", "predictor_dim_feedforward", "predictor_num_layers"):
            check_int(field, getattr(self, field), 1)
        if self.predictor_d_model % self.predictor_nhead != 0:
            fail(
                "predictor_d_model",
                f"({self.predictor_d_model}) is not divisible by predictor_nhead ({self.predictor_nhead})",
                "Choose a width that is a multiple of the head count.",
            )
        if self.predictor_d_model % 4 != 0:
            fail(
                "predictor_d_model",
                f"({self.predictor_d_model}) is not divisible by 4",
                "The predictors' output MLP narrows to d/2 and d/4; use a multiple of 4.",
            )
        if isinstance(self.mask_loss_weight, bool) or not isinstance(self.mask_loss_weight, (int, float)):
            fail("mask_loss_weight", f"must be a number, got {self.mask_loss_weight!r}", "Pass a float.")
        if self.mask_loss_weight < 0:
            fail("mask_loss_weight", f"is {self.mask_loss_weight}, negative", "Use a weight >= 0.")
