"""moespeed: pre-train and run efficient sparse language models (MLA, DeepSeekMoE, PEER).

    from moespeed import ModelConfig, Transformer, load
    model = Transformer(ModelConfig(vocab_size=4096))
    loss = model(tokens, targets, doc_ids)           # tokens/targets/doc_ids: (B, T) int64
    model, tokenizer = load("runs/quickstart-...")   # a trained run's latest checkpoint
"""

__version__ = "0.1.0"

from .config import Config, DataConfig, ModelConfig, TrainConfig, build_config  # noqa: E402
from .model.transformer import Transformer  # noqa: E402
from .run import load  # noqa: E402

__all__ = ["Config", "DataConfig", "ModelConfig", "TrainConfig", "Transformer", "build_config", "load"]
