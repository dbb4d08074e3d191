"""A toy model family for the family-independent trainer tests (and the torchrun test's entry point).

The toy model has the 3D model's layout, ``model.encoder`` / ``model.projector`` / ``model.language_model``
(a 2-layer Qwen2 text model) + ``lm_head``, so stages, LoRA targeting, token rows, checkpoints and
resume are exercised exactly as for the real families, in milliseconds. Run as a script it trains the
toy under torchrun and dumps this rank's parameters (see ``test_multiprocess.py``).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.data import Dataset
from transformers import PretrainedConfig, PreTrainedModel, Qwen2Config, Qwen2Model
from transformers.modeling_outputs import CausalLMOutput

from reasonknee3d.constants import IGNORE_INDEX
from reasonknee3d.config import TrainConfig
from reasonknee3d.data.transforms import PreprocessConfig
from reasonknee3d.families import ExperimentConfig, Family

VOCAB = 40
NEW_TOKENS = [36, 37, 38, 39]  # "added" tokens whose rows train with train.new_token_rows
VOLUME_DIM = 8


class ToyConfig(PretrainedConfig):
    model_type = "toy_reasonknee"

    def __init__(self, hidden: int = 16, tie_word_embeddings: bool = False, **kwargs: Any) -> None:
        self.hidden = hidden
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


class ToyInner(nn.Module):
    def __init__(self, config: ToyConfig) -> None:
        super().__init__()
        self.encoder = nn.Linear(VOLUME_DIM, config.hidden)
        self.projector = nn.Sequential(nn.Linear(config.hidden, config.hidden), nn.GELU(),
                                       nn.Linear(config.hidden, config.hidden))
        self.language_model = Qwen2Model(Qwen2Config(
            vocab_size=VOCAB, hidden_size=config.hidden, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64))


class ToyModel(PreTrainedModel):
    config_class = ToyConfig
    base_model_prefix = "model"
    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: ToyConfig) -> None:
        super().__init__(config)
        self.model = ToyInner(config)
        self.lm_head = nn.Linear(config.hidden, VOCAB, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.language_model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, input_ids: torch.Tensor, volumes: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None) -> CausalLMOutput:
        text = self.model.language_model.embed_tokens(input_ids)                 # (B, T, C)
        vol = self.model.projector(self.model.encoder(volumes)).unsqueeze(1)    # (B, 1, C)
        mask = None if attention_mask is None else torch.cat([attention_mask[:, :1], attention_mask], 1)
        hidden = self.model.language_model(inputs_embeds=torch.cat([vol, text], 1),
                                           attention_mask=mask).last_hidden_state[:, 1:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1),
                                               ignore_index=IGNORE_INDEX)
        return CausalLMOutput(loss=loss, logits=logits)


class ToyDataset(Dataset):
    """Deterministic items of variable length: prompt tokens (masked) then answer tokens (incl. new ones)."""

    def __init__(self, n: int = 24, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for i in range(n):
            prompt = torch.randint(1, 30, (3 + i % 4,), generator=g)
            # A new token mid-answer: its embedding row feeds later positions and its lm_head row is a target.
            answer = torch.cat([torch.randint(1, 30, (1,), generator=g), torch.tensor([NEW_TOKENS[i % 4]]),
                                torch.randint(1, 30, (1,), generator=g)])
            self.items.append({"volume": torch.randn(VOLUME_DIM, generator=g), "prompt": prompt, "answer": answer})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.items[i]


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    seqs = [torch.cat([it["prompt"], it["answer"]]) for it in items]
    width = max(len(s) for s in seqs)
    input_ids = torch.zeros(len(items), width, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX)
    mask = torch.zeros(len(items), width, dtype=torch.long)
    for row, (it, seq) in enumerate(zip(items, seqs)):
        input_ids[row, :len(seq)] = seq
        mask[row, :len(seq)] = 1
        labels[row, len(it["prompt"]):len(seq)] = it["answer"]
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels,
            "volumes": torch.stack([it["volume"] for it in items])}


@dataclass
class ToyModelArgs:
    """The toy family's ``model:`` section."""
    hidden: int = 16


class ToyFamily(Family):
    model_class = ToyModel
    model_config_class = ToyModelArgs

    def __init__(self, tie_word_embeddings: bool = False, n_samples: int = 24) -> None:
        self.tie = tie_word_embeddings
        self.n_samples = n_samples

    def owns_model_dir(self, config: dict[str, Any]) -> bool:
        return config.get("model_type") == ToyConfig.model_type

    def build(self, exp: ExperimentConfig, attn_implementation: str) -> tuple[nn.Module, Any]:
        return ToyModel(ToyConfig(tie_word_embeddings=self.tie, hidden=exp.model.hidden)), None

    def load(self, model_dir: str | Path, attn_implementation: str) -> tuple[nn.Module, Any]:
        return ToyModel.from_pretrained(model_dir), None

    def module_paths(self, model: nn.Module) -> dict[str, list[str]]:
        return {"encoder": ["model.encoder"], "projector": ["model.projector"],
                "language_model": ["model.language_model", "lm_head"]}

    def new_token_ids(self, model: nn.Module, processor: Any) -> list[int]:
        return list(NEW_TOKENS)

    def coord_token_ids(self, model: nn.Module, processor: Any) -> list[int]:
        return list(NEW_TOKENS)  # stand-ins for <|coord_0..3|>

    def train_data(self, exp: ExperimentConfig, model: nn.Module, processor: Any) -> tuple[Dataset, Any]:
        return ToyDataset(self.n_samples), collate

    def train_lengths(self, dataset: Dataset) -> Optional[list[int]]:
        return [len(it["prompt"]) + len(it["answer"]) for it in dataset.items]

    # Generation is covered by the real families' predict tests; the toy only trains.
    def predict_data(self, model: nn.Module, processor: Any, data_dir: Any, split: str) -> Any:
        raise NotImplementedError("the toy family does not predict")

    def decode(self, model: nn.Module, processor: Any, generated: torch.Tensor, orig_shapes: Any) -> list[str]:
        raise NotImplementedError("the toy family does not predict")

    def num_bins(self, model: nn.Module) -> int:
        raise NotImplementedError("the toy family does not predict")

    # The toy has no data layer of its own.
    def preprocess(self, exp: Any, data_dir: Any, splits: Any, cache_dir: Any = None) -> Any:
        raise NotImplementedError("the toy family has no cache")

    def num_visual_tokens(self, exp: Any, volume_shape: Any) -> int:
        return 1

    def processor_visual_tokens(self, exp: Any, lm_dir: Any, volume: Any, prompt: str) -> int:
        raise NotImplementedError("the toy family has no processor")

    def file_batch(self, model: nn.Module, processor: Any, volume_path: Any, prompt: str, knee_side: Any = None) -> Any:
        raise NotImplementedError("the toy family does not predict")

    def example_batch(self, model: nn.Module, processor: Any, volume: Any, prompt: str, answer: str) -> Any:
        raise NotImplementedError("the toy family has no processor")


def toy_experiment(output_dir: str | Path, **train: Any) -> ExperimentConfig:
    """A toy experiment writing to ``output_dir``; ``train`` overrides TrainConfig fields."""
    settings = dict(stage="instruction", output_dir=str(output_dir), max_steps=6, logging_steps=1, save_steps=2,
                    per_device_batch_size=2, learning_rate=1e-2, warmup_ratio=0.0, lr_scheduler="linear",
                    dataloader_num_workers=0, report_to=[], lora={"r": 4, "alpha": 8, "dropout": 0.0,
                                                                  "targets": ["q_proj", "v_proj"]})
    settings.update(train)
    lora = settings.pop("lora")
    return ExperimentConfig(family="3d", data=PreprocessConfig(), model=ToyModelArgs(),
                            train=TrainConfig(lora=lora, **settings))


if __name__ == "__main__":
    # torchrun entry: train the toy in DDP, then every rank saves its own copy of the trained parameters.
    from reasonknee3d.training.trainer import run_training
    out = Path(sys.argv[1])
    result = run_training(toy_experiment(out, max_steps=4, save_steps=100), family=ToyFamily())
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    torch.save({n: p.detach().clone() for n, p in result.model.named_parameters()}, out / f"params_rank{rank}.pt")
