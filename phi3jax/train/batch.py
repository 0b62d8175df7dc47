"""The batch format every training and evaluation step takes: a dict of [B, T] arrays.

    inputs       int32    token ids fed to the model
    targets      int32    the next token of each input (anything where loss_mask is 0)
    loss_mask    float32  1 where the target counts (not padding, not a document boundary,
                          only assistant tokens in chat fine-tuning)
    segment_ids  int32    document id of each token in a packed row (0 = padding)
    positions    int32    position of each token within its document

`phi3jax.train.data` produces it, `phi3jax.train.step` consumes it.
"""

BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")
