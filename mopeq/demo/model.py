"""The demo model: a tiny DeepSeek-VL2-shaped MoE vision-language model.

A vision encoder turns an 8x8 digit image into a few patch features, a projector maps them into the
language model's embedding space, and a transformers ``DeepseekV2ForCausalLM`` (fused routed experts,
one shared expert, top-k router, compressed-KV attention) reads image tokens and bytes.

Keys on disk follow DeepSeek-VL2: ``vision.*``, ``projector.*``, ``language.model.layers.N.mlp...``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

WEIGHTS_DIR = Path(__file__).parent / "weights"

# Byte-level vocabulary: 0..255 are bytes, then a few specials.
BOS_ID, IMAGE_ID, PAD_ID = 256, 257, 258
VOCAB_SIZE = 264


def encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def decode(ids) -> str:
    return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


@dataclass
class DemoConfig:
    model_type: str = "mopeq_demo_vlm"
    image_size: int = 8
    patch_size: int = 4
    vision_dim: int = 64
    hidden_size: int = 128
    num_hidden_layers: int = 4
    n_routed_experts: int = 16
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 96
    n_shared_experts: int = 1
    first_k_dense_replace: int = 0
    num_attention_heads: int = 4
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    max_position_embeddings: int = 256
    version: int = 1
    extra: dict = field(default_factory=dict)

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def language_config(self) -> DeepseekV2Config:
        return DeepseekV2Config(
            vocab_size=VOCAB_SIZE,
            hidden_size=self.hidden_size,
            intermediate_size=self.moe_intermediate_size * 2,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_attention_heads,
            n_routed_experts=self.n_routed_experts,
            num_experts_per_tok=self.num_experts_per_tok,
            moe_intermediate_size=self.moe_intermediate_size,
            n_shared_experts=self.n_shared_experts,
            first_k_dense_replace=self.first_k_dense_replace,
            kv_lora_rank=self.kv_lora_rank,
            q_lora_rank=None,
            qk_nope_head_dim=self.qk_nope_head_dim,
            qk_rope_head_dim=self.qk_rope_head_dim,
            v_head_dim=self.v_head_dim,
            max_position_embeddings=self.max_position_embeddings,
            pad_token_id=PAD_ID,
            bos_token_id=BOS_ID,
            eos_token_id=PAD_ID,
            tie_word_embeddings=False,
            attn_implementation="eager",
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DemoConfig":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class VisionEncoder(nn.Module):
    """Patchify an image, embed each patch, and mix patches with one MLP over the whole image."""

    def __init__(self, cfg: DemoConfig):
        super().__init__()
        self.patch = cfg.patch_size
        n, d = cfg.num_image_tokens, cfg.vision_dim
        self.patch_embed = nn.Linear(cfg.patch_size**2, d)
        self.pos_embed = nn.Parameter(torch.zeros(n, d))
        self.mix = nn.Sequential(nn.Linear(n * d, 4 * d), nn.GELU(), nn.Linear(4 * d, n * d))
        self.norm = nn.LayerNorm(d)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b, s, p = images.shape[0], images.shape[-1], self.patch
        patches = images.reshape(b, s // p, p, s // p, p).permute(0, 1, 3, 2, 4).reshape(b, -1, p * p)
        x = self.patch_embed(patches) + self.pos_embed  # [B, N, D]
        x = x + self.mix(x.flatten(1)).view_as(x)
        return self.norm(x)


class DemoVLM(nn.Module):
    """Vision encoder + projector + DeepseekV2 MoE language model."""

    def __init__(self, cfg: DemoConfig):
        super().__init__()
        self.config = cfg
        self.vision = VisionEncoder(cfg)
        self.projector = nn.Sequential(
            nn.Linear(cfg.vision_dim, cfg.hidden_size), nn.GELU(), nn.Linear(cfg.hidden_size, cfg.hidden_size)
        )
        self.language = DeepseekV2ForCausalLM(cfg.language_config())

    def embed(self, input_ids: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
        embeds = self.language.get_input_embeddings()(input_ids)  # [B, T, H]
        if images is not None:
            image_embeds = self.projector(self.vision(images)).to(embeds.dtype)  # [B, N, H]
            mask = input_ids == IMAGE_ID
            embeds = embeds.masked_scatter(mask.unsqueeze(-1), image_embeds[mask.sum(1) > 0].reshape(-1, embeds.shape[-1]))
        return embeds

    def forward(self, input_ids: torch.Tensor, images: torch.Tensor | None = None, **kwargs):
        return self.language(inputs_embeds=self.embed(input_ids, images), use_cache=False, **kwargs)

    @torch.no_grad()
    def answer(self, images: torch.Tensor, questions: list[str], max_new_tokens: int = 4) -> list[str]:
        """Greedy answers to one question per image. Example: ``model.answer(imgs, ["which digit?"])``."""
        prompts = [vqa_prompt(self.config, q) for q in questions]
        width = max(map(len, prompts))
        # Left-pad so every prompt ends at the same position; padding is masked out of attention.
        ids = torch.full((len(prompts), width), PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        out = [[] for _ in prompts]
        for _ in range(max_new_tokens):
            pos = (mask.cumsum(1) - 1).clamp(min=0)
            logits = self(ids, images, attention_mask=mask, position_ids=pos).logits[:, -1]
            nxt = logits[:, :256].argmax(-1)
            for i, t in enumerate(nxt.tolist()):
                out[i].append(t)
            ids = torch.cat([ids, nxt[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        return [decode(o).split("\n")[0] for o in out]


@torch.no_grad()
def greedy_matches(model: "DemoVLM", images: torch.Tensor, questions: list[str], answers: list[str]) -> list[bool]:
    """Whether greedy decoding would produce exactly ``answer`` then a newline, for each question.

    Greedy output equals ``answer + "\n"`` iff, teacher-forced along that string, the argmax over bytes
    matches every next token; so one forward pass replaces token-by-token generation.
    """
    seqs = [(vqa_prompt(model.config, q), encode(a + "\n")) for q, a in zip(questions, answers)]
    width = max(len(p) + len(a) for p, a in seqs)
    ids = torch.full((len(seqs), width), PAD_ID, dtype=torch.long)
    for i, (p, a) in enumerate(seqs):
        ids[i, : len(p) + len(a)] = torch.tensor(p + a)
    pred = model(ids, images).logits[..., :256].argmax(-1)  # [B, T]; right padding leaves the prefix causal
    return [bool((pred[i, len(p) - 1 : len(p) + len(a) - 1] == torch.tensor(a)).all()) for i, (p, a) in enumerate(seqs)]


def vqa_prompt(cfg: DemoConfig, question: str) -> list[int]:
    return [BOS_ID] + [IMAGE_ID] * cfg.num_image_tokens + encode(f"Q: {question}\nA: ")


def save_demo(model: DemoVLM, directory: Path, dtype=torch.float16) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")


def load_demo(directory: Path | str | None = None, dtype=torch.float32) -> DemoVLM:
    """Load the demo model (the shipped weights when ``directory`` is None)."""
    directory = Path(directory) if directory is not None else WEIGHTS_DIR
    cfg = DemoConfig.from_dict(json.loads((directory / "config.json").read_text()))
    model = DemoVLM(cfg)
    state = load_file(str(directory / "model.safetensors"))
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()})
    return model.to(dtype).eval()
