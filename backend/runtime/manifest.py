"""The model directory contract between model_build (writes it) and the backend (reads it).

    MODEL_DIR/
      manifest.json
      fp16/{vision,text_encoder,decoder}.{xml,bin}
      fp16/text_encoder.words.npy   the question encoder's word-embedding table (float16), which the
                                    runtime looks up itself; an INT8 build's text_encoder shares it
      processor/            tokenizer.json and the checkpoint's processor files

`manifest.json` records where the weights came from, the token ids and image settings serving
needs (so nothing is assumed about a particular checkpoint), and every file with its size and
sha256, so a half-copied or edited directory is refused with a precise message instead of
producing wrong text.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

MANIFEST = "manifest.json"
# 2: the question encoder's image keys/values are a part of their own (text_encoder_kv)
# 3: its word-embedding table is a file of its own (WORD_TABLE), its IR takes the rows (word_embeds)
# 4: the decoder attends to the encoder states themselves (model_build/graphs.py): no cross_kv part
# 5: so does the question encoder: no text_encoder_kv part, its IR takes the image embeddings
# 6: the decoder's self-attention cache has a fixed capacity: past_length in, new_kv out (not present_kv)
FORMAT = 6
WORD_TABLE = "text_encoder.words.npy"
# Parts every model directory has; the text encoder's only when the checkpoint answers questions.
CAPTION_PARTS = ("vision", "decoder")
VQA_PARTS = ("vision", "text_encoder", "decoder")


class ModelDirError(Exception):
    """The model directory is missing, incomplete or does not match its manifest."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_entry(model_dir: Path, path: Path) -> dict[str, Any]:
    return {
        "path": path.relative_to(model_dir).as_posix(),
        "bytes": path.stat().st_size,
        "sha256": sha256_of(path),
    }


@dataclass(frozen=True)
class Manifest:
    model_dir: Path
    data: dict[str, Any]

    @property
    def tasks(self) -> list[str]:
        return list(self.data["source"]["tasks"])

    @property
    def precisions(self) -> list[str]:
        return list(self.data["parts"])

    def part_xml(self, precision: str, part: str) -> Path:
        try:
            return self.model_dir / self.data["parts"][precision][part]["files"][0]["path"]
        except KeyError:
            raise ModelDirError(
                f"{self.model_dir / MANIFEST}: no {precision} part {part!r} "
                f"(has {', '.join(self.data['parts'].get(precision, {})) or 'none'})"
            ) from None

    def part_table(self, precision: str, part: str) -> Path | None:
        """The part's word-embedding table (`WORD_TABLE`), if it has one."""
        self.part_xml(precision, part)  # a precise error for a missing part
        files = self.data["parts"][precision][part]["files"]
        return next((self.model_dir / f["path"] for f in files if f["path"].endswith(".npy")), None)

    @property
    def caption_dir(self) -> Path | None:
        """The paired captioning model's directory (`blip-build ... --caption-model`), if any."""
        entry = self.data.get("caption_model")
        return self.model_dir / entry["path"] if entry else None

    @property
    def served_precision(self) -> str:
        """INT8 when it was built and passed its agreement gate, FP16 otherwise."""
        return "int8" if "int8" in self.data["parts"] and self.data.get("int8", {}).get("serve") else "fp16"

    @property
    def fingerprint(self) -> str:
        """A short hash of every file's content: two builds differ iff their fingerprints do."""
        digest = hashlib.sha256()
        for precision in sorted(self.data["parts"]):
            for part in sorted(self.data["parts"][precision]):
                for f in self.data["parts"][precision][part]["files"]:
                    digest.update(f["sha256"].encode())
        if "caption_model" in self.data:
            digest.update(self.data["caption_model"]["fingerprint"].encode())
        return digest.hexdigest()[:8]

    def model_version(self, precision: str) -> str:
        """`<checkpoint>-<precision>-<fingerprint>`: differs iff the served weights differ.

        Label Studio stores it with each prediction, so it must not change between requests of one
        build (or "Retrieve predictions" stores them again) and must change with the weights.
        """
        source = str(self.data["source"].get("model", "blip")).rstrip("/")
        path = PurePosixPath(source.replace("\\", "/"))
        name = path.name
        if name.lower() in ("", "checkpoint", "model", "models", "."):
            name = path.parent.name or "blip"
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "blip"
        return f"{name}-{precision}-{self.fingerprint}"


def load_manifest(model_dir: str | Path, verify_hashes: bool = True) -> Manifest:
    """Read and check `MODEL_DIR/manifest.json` against the files next to it."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelDirError(f"model directory {model_dir} does not exist (build one with `blip-build`)")
    path = model_dir / MANIFEST
    if not path.is_file():
        raise ModelDirError(f"{model_dir} has no {MANIFEST}: not a model directory built by `blip-build`")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelDirError(f"{path} is unreadable: {e}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ModelDirError(
            f"{path}: manifest format {data.get('format') if isinstance(data, dict) else '?'} "
            f"is not {FORMAT}; rebuild the model directory with this version of blip-build"
        )
    for key in ("source", "tokens", "image", "text", "generation", "parts"):
        if key not in data:
            raise ModelDirError(f"{path}: missing {key!r}")
    required = VQA_PARTS if "answer" in data["source"]["tasks"] else CAPTION_PARTS
    for precision, parts in data["parts"].items():
        missing = [p for p in required if p not in parts]
        if missing:
            raise ModelDirError(f"{path}: {precision} build lacks part(s) {', '.join(missing)}")
        for part, entry in parts.items():
            for f in entry["files"]:
                _check_file(model_dir, f, f"{precision}/{part}", verify_hashes)
    if "caption_model" in data:
        entry = data["caption_model"]
        captions = load_manifest(model_dir / entry["path"], verify_hashes)
        if captions.fingerprint != entry["fingerprint"]:
            raise ModelDirError(
                f"{path}: the caption model in {captions.model_dir} is not the one this build paired "
                f"(fingerprint {captions.fingerprint}, expected {entry['fingerprint']}); rebuild it"
            )
    return Manifest(model_dir, data)


def _check_file(model_dir: Path, entry: dict[str, Any], what: str, verify_hash: bool) -> None:
    path = model_dir / entry["path"]
    if not path.is_file():
        raise ModelDirError(
            f"{what}: {path} is missing (the model directory is incomplete; rebuild or re-copy it)"
        )
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise ModelDirError(
            f"{what}: {path} has {size} bytes, manifest says {entry['bytes']} (truncated or replaced file)"
        )
    if verify_hash and sha256_of(path) != entry["sha256"]:
        raise ModelDirError(
            f"{what}: {path} does not match the sha256 in the manifest (corrupt or replaced file)"
        )
