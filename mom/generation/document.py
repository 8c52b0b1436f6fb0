"""Sample an interleaved document from a trained MoM and decode it to text, PNG and WAV.

    ids = generate_document(model, tokenizer, "a handwritten digit seven", then="image")
    paths = write_document(tokenizer.decode_document(ids), Path("samples"), tokenizer.speech_sample_rate)
    pixels = sample_token_image(model, tokenizer, "a handwritten digit seven", seed=3)   # that image alone (h, w, 3)

Decoding is constrained to well-formed documents (`SpanConstraint`): outside media spans only text ids, span
openers and EOS may follow; inside an image span exactly ``tokens_per_image`` image codes, then the closing marker;
inside a speech span speech units until the closing marker (or ``--max-speech-units``). The prompt is
``<s> text`` followed by the opener of ``--then`` (``image`` / ``speech``), or nothing for ``--then text``. The
command line is `mom.cli.generate` (``mom-generate``).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch
from transformers import LogitsProcessor

from mom.tokenization.multimodal import MultimodalTokenizer
from mom.tokenization.special import BOI_ID, BOS_ID, BOSP_ID, EOI_ID, EOS_ID, EOSP_ID, PAD_ID

THEN = ("text", "image", "speech")  # what may follow the prompt
# Below this RMS level a decoded clip is near-silent: speech is recorded around -30 to -20 dBFS RMS, and 16-bit audio's
# dither noise floor is about -96 dBFS; -50 dBFS sits well between the two.
QUIET_DBFS = -50.0
OUTPUT_FILE = re.compile(r"text\.txt|image_\d+\.png|speech_\d+\.wav")  # what `write_document` writes


class SpanConstraint(LogitsProcessor):
    """Masks the logits so that every sampled document parses: media spans hold only their modality's ids, an image
    span exactly ``tokens_per_image`` codes, a speech span at most ``max_speech_units`` units."""

    def __init__(self, tokenizer: MultimodalTokenizer, max_speech_units: int = 500) -> None:
        self.ranges = {m: (o, o + v) for m, o, v in zip(tokenizer.modalities, tokenizer.offsets.values(),
                                                          tokenizer.vocab_sizes)}
        self.tokens_per_image = getattr(tokenizer.image, "tokens_per_image", None) if "image" in self.ranges else None
        self.max_speech_units = max_speech_units
        self.text_range = self.ranges["text"]
        self.openers = {BOI_ID: "image", BOSP_ID: "speech"}
        absent = [t for t, m in self.openers.items() if m not in self.ranges]
        self.forbidden_in_text = [PAD_ID, BOS_ID, EOI_ID, EOSP_ID, *absent]

    def state(self, row: list[int]) -> tuple[str, int]:
        """(current span: "text" / "image" / "speech", tokens emitted inside it)."""
        for back, token in enumerate(reversed(row)):
            if token in self.openers:
                return self.openers[token], back
            if token in (EOI_ID, EOSP_ID, BOS_ID):
                break
        return "text", 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        allowed = torch.zeros_like(scores, dtype=torch.bool)  # (b, V)
        for i, row in enumerate(input_ids.tolist()):
            span, emitted = self.state(row)
            if span == "text":
                lo, hi = self.text_range
                allowed[i, lo:hi] = True
                allowed[i, self.forbidden_in_text] = False
            elif span == "image" and emitted >= self.tokens_per_image:
                allowed[i, EOI_ID] = True
            elif span == "speech" and emitted >= self.max_speech_units:
                allowed[i, EOSP_ID] = True
            else:
                lo, hi = self.ranges[span]
                allowed[i, lo:hi] = True
                if span == "speech" and emitted > 0:
                    allowed[i, EOSP_ID] = True
        return scores.masked_fill(~allowed, float("-inf"))


def generate_document(
    model,
    tokenizer: MultimodalTokenizer,
    prompt: str,
    then: str = "text",
    max_new_tokens: int = 200,
    temperature: float = 1.0,
    top_k: int = 0,
    max_speech_units: int = 500,
    seed: int = 0,
) -> list[int]:
    """Unified ids of one sampled document: the prompt, then what the model adds until EOS or ``max_new_tokens``."""
    opener = {"text": [], "image": [BOI_ID], "speech": [BOSP_ID]}
    if then not in opener or (then != "text" and then not in tokenizer.modalities):
        raise ValueError(f"then: expected one of {['text', *tokenizer.modalities[1:]]} (the tokenizer's "
                         f"modalities), got {then!r}")
    ids = [BOS_ID] + tokenizer.encode_text(prompt) + opener[then]
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    out = model.generate(
        torch.tensor([ids], device=device),
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None,
        top_k=top_k or None,
        logits_processor=[SpanConstraint(tokenizer, max_speech_units)],
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,
    )
    return out[0].tolist()


def sample_token_image(
    model,
    tokenizer: MultimodalTokenizer,
    prompt: str,
    temperature: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
) -> np.ndarray:
    """The image a document sampled with ``then="image"`` and ``seed`` starts with (``generate_document`` stopped
    after ``</image>``) -> uint8 (h, w, 3). Sampling draws the same ids whatever ``max_new_tokens``, so this is the
    ``image_0.png`` of ``mom-generate --then image --seed SEED``."""
    if "image" not in tokenizer.modalities:
        raise ValueError(f"the tokenizer has no image modality (it has {list(tokenizer.modalities)})")
    codes = tokenizer.image.tokens_per_image
    ids = generate_document(model, tokenizer, prompt, "image", codes + 1, temperature, top_k, seed=seed)
    return next(value for kind, value in tokenizer.decode_document(ids) if kind == "image")


def close_open_span(ids: list[int], constraint: SpanConstraint) -> list[int]:
    """Drop an unfinished media span at the end (``max_new_tokens`` ran out inside it)."""
    span, emitted = constraint.state(ids)
    return ids if span == "text" else ids[: len(ids) - emitted - 1]


def level_dbfs(samples: np.ndarray) -> float:
    """RMS level of a clip in dB relative to full scale (1.0); -inf for an empty or all-zero clip."""
    rms = float(np.sqrt(np.mean(np.square(samples, dtype=np.float64)))) if len(samples) else 0.0
    return 20 * math.log10(rms) if rms > 0 else -math.inf


def write_document(parts, out_dir: Path, sample_rate: int | None) -> list[Path]:
    """text.txt, image_<i>.png, speech_<i>.wav for the decoded parts; those of an earlier document in ``out_dir``
    are removed first (other files are left alone)."""
    from PIL import Image

    from mom.utils.audio import write_audio

    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.iterdir():
        if OUTPUT_FILE.fullmatch(old.name) and old.is_file():
            old.unlink()
    written, text, counts = [], [], {"image": 0, "speech": 0}
    for kind, value in parts:
        if kind == "text":
            text.append(value)
            continue
        path = out_dir / f"{kind}_{counts[kind]}.{'png' if kind == 'image' else 'wav'}"
        counts[kind] += 1
        text.append(f"[{path.name}]")
        if kind == "image":
            Image.fromarray(np.asarray(value, dtype=np.uint8)).save(path)
        else:
            write_audio(path, value, sample_rate)
        written.append(path)
    (out_dir / "text.txt").write_text("".join(text) + "\n")
    return [out_dir / "text.txt", *written]
