"""Gradients of one mixed batch with and without gradient checkpointing, for the multimodal
families' tests."""

from __future__ import annotations

from functools import partial

import numpy as np


def checkpointed_and_not(overrides: list[str], data_file, max_seq_len: int) -> list[dict]:
    """[plain, checkpointed] gradients ({name: array}) of a batch of the file's first three rows,
    LoRA B nudged off zero so that A gets a gradient too."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from mlxtune import trainer
    from mlxtune.config import load_config
    from mlxtune.data.batching import collate
    from mlxtune.model import checkpoint_layers

    grads = []
    for checkpointed in (False, True):
        engine = trainer.setup(load_config(None, overrides))
        model = engine.model
        for path, value in tree_flatten(model.trainable_parameters()):
            if path.endswith("lora_b"):
                model.load_weights([(path, value + 0.01)], strict=False)
        if checkpointed:
            checkpoint_layers(model)
        data = engine.dataset(str(data_file))
        batch = collate(data.examples, [[0, 1], [2]], max_seq_len)
        fn = nn.value_and_grad(model, partial(trainer.batch_loss, model, engine.split, 16))
        _, g = fn(*trainer.device_arrays(batch, 64))
        grads.append({k: np.array(v) for k, v in tree_flatten(g)})
    return grads
