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

from mom.model.generate_loop import DeviceLogitsProcessor
from mom.tokenization.multimodal import MultimodalTokenizer
from mom.tokenization.special import BOI_ID, BOS_ID, BOSP_ID, EOI_ID, EOS_ID, EOSP_ID, PAD_ID

THEN = ("text", "image", "speech")  # what may follow the prompt
# Below this RMS level a decoded clip is near-silent: speech is recorded around -30 to -20 dBFS RMS, and 16-bit audio's
# dither noise floor is about -96 dBFS; -50 dBFS sits well between the two.
QUIET_DBFS = -50.0
OUTPUT_FILE = re.compile(r"text\.txt|image_\d+\.png|speech_\d+\.wav")  # what `write_document` writes


class SpanConstraint(DeviceLogitsProcessor):
    """Masks the logits so that every sampled document parses: media spans hold only their modality's ids, an image
    span exactly ``tokens_per_image`` codes, a speech span at most ``max_speech_units`` units.

    Each row's state (the span it is in, the tokens emitted inside it) is found from its ids on the device, with no
    read of them on the host: MoM's own generate loop runs it between CUDA-graph steps without waiting
    (`mom.model.generate_loop.DeviceLogitsProcessor`)."""

    # what a row may emit next, by case (`_case`): a row of `_table`
    TEXT, IMAGE_CODES, IMAGE_CLOSE, SPEECH_FIRST, SPEECH_MORE, SPEECH_CLOSE = range(6)

    def __init__(self, tokenizer: MultimodalTokenizer, max_speech_units: int = 500) -> None:
        self.ranges = {m: (o, o + v) for m, o, v in zip(tokenizer.modalities, tokenizer.offsets.values(),
                                                          tokenizer.vocab_sizes)}
        self.tokens_per_image = getattr(tokenizer.image, "tokens_per_image", None) if "image" in self.ranges else None
        self.max_speech_units = max_speech_units
        self.openers = {BOI_ID: "image", BOSP_ID: "speech"}
        absent = [t for t, m in self.openers.items() if m not in self.ranges]
        self.forbidden_in_text = [PAD_ID, BOS_ID, EOI_ID, EOSP_ID, *absent]
        self._tables: dict[tuple[int, torch.device], torch.Tensor] = {}

    def _table(self, vocab: int, device: torch.device) -> torch.Tensor:
        """(6, vocab) bool: the ids allowed in each case."""
        key = (vocab, device)
        if key not in self._tables:
            table = torch.zeros(6, vocab, dtype=torch.bool)
            lo, hi = self.ranges["text"]
            table[self.TEXT, lo:hi] = True
            table[self.TEXT, self.forbidden_in_text] = False
            if "image" in self.ranges:
                lo, hi = self.ranges["image"]
                table[self.IMAGE_CODES, lo:hi] = True
            table[self.IMAGE_CLOSE, EOI_ID] = True
            if "speech" in self.ranges:
                lo, hi = self.ranges["speech"]
                table[self.SPEECH_FIRST, lo:hi] = True
                table[self.SPEECH_MORE, lo:hi] = True
            table[self.SPEECH_MORE, EOSP_ID] = True
            table[self.SPEECH_CLOSE, EOSP_ID] = True
            self._tables[key] = table.to(device)
        return self._tables[key]

    def states(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (b, n) -> (span (b,): 0 text, 1 image, 2 speech; tokens emitted inside it (b,), 0 in text). A row is in
        the span its last opener opened, unless a closer (or ``<s>``) came after it."""
        b, n = input_ids.shape
        markers = torch.tensor([BOI_ID, BOSP_ID, EOI_ID, EOSP_ID, BOS_ID], device=input_ids.device)
        positions = torch.arange(-1, n, device=input_ids.device)  # -1: a column before the first id, no marker
        is_marker = torch.cat([input_ids.new_ones(b, 1, dtype=torch.bool), torch.isin(input_ids, markers)], dim=1)
        last = torch.where(is_marker, positions, -1).amax(dim=1)  # (b,) the last marker's position, -1: none
        token = input_ids.gather(1, last.clamp(min=0)[:, None])[:, 0] if n else last
        found = last >= 0
        span = torch.where(found & (token == BOI_ID), 1, torch.where(found & (token == BOSP_ID), 2, 0))
        emitted = torch.where(span > 0, n - 1 - last, 0)
        return span, emitted

    def _case(self, span: torch.Tensor, emitted: torch.Tensor) -> torch.Tensor:
        """(b,) row of `_table` for each row's state."""
        image = torch.where(emitted >= (self.tokens_per_image or 0), self.IMAGE_CLOSE, self.IMAGE_CODES)
        speech = torch.where(emitted >= self.max_speech_units, self.SPEECH_CLOSE,
                             torch.where(emitted > 0, self.SPEECH_MORE, self.SPEECH_FIRST))
        return torch.where(span == 1, image, torch.where(span == 2, speech, self.TEXT))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        allowed = self._table(scores.shape[1], scores.device)[self._case(*self.states(input_ids))]  # (b, V)
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
    span, emitted = (int(t[0]) for t in constraint.states(torch.tensor([ids])))
    return ids if span == 0 else ids[: len(ids) - emitted - 1]


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
