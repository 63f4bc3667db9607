"""The real Qwen3-VL tokenizer, built offline from the Qwen BPE ranks that ship on PyPI.

The Qwen2/Qwen3 byte-level BPE (151,643 ranks) is published inside the Apache-2.0 ``dashscope==2.0.2``
wheel as ``dashscope/resources/qwen.tiktoken``. ``pip download --no-deps dashscope==2.0.2`` fetches the
2.4 MB wheel; only that member is read (dashscope itself is never installed). transformers'
``TikTokenConverter`` (needs ``tiktoken``) turns the ranks into a fast tokenizer; the 26 Qwen3-VL special
tokens then get ids 151643..151668, exactly as in ``Qwen/Qwen3-VL-4B-Instruct``'s tokenizer.json, and the
five Robometer tokens (added by ``load_tokenizer``) 151669..151673 -- the released checkpoint's 151,674
embedding rows. Used by the compatibility tests and to make an offline stand-in for the base model
directory; on a machine with internet, use the real ``Qwen/Qwen3-VL-4B-Instruct`` download instead.

``python -m robometer_ros.model.qwen_vocab OUT_DIR [--source WHEEL_OR_TIKTOKEN]`` writes tokenizer.json,
tokenizer_config.json and chat_template.jinja (base tokens only, like the base model directory).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, normalizers

from robometer_ros.model.config import QWEN3VL_SPECIAL_TOKENS
from robometer_ros.model.tokenizer import (
    CHAT_TEMPLATE_FILE,
    EOS_TOKEN,
    PAD_TOKEN,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    qwen3vl_chat_template,
)

DASHSCOPE_WHEEL = "dashscope-2.0.2-py3-none-any.whl"
TIKTOKEN_MEMBER = "dashscope/resources/qwen.tiktoken"
QWEN_TIKTOKEN_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"
#: number of BPE ranks; the special tokens start right after them
QWEN_BPE_SIZE = 151643
#: Qwen2/Qwen3 pre-tokenizer split (single digits, unlike tiktoken's cl100k ``\p{N}{1,3}``)
QWEN_PRETOKENIZE_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
    r"""|\s+(?!\S)|\s+"""
)
#: where scripts/setup_venv.sh puts the wheel (override with ROBOMETER_ROS_TESTDATA)
TESTDATA_ENV = "ROBOMETER_ROS_TESTDATA"


def default_testdata_dir() -> Path:
    """``$ROBOMETER_ROS_TESTDATA`` or ``<venv>/share/robometer_ros_testdata``."""
    return Path(os.environ.get(TESTDATA_ENV) or Path(sys.prefix) / "share" / "robometer_ros_testdata")


def find_qwen_vocab(directory: str | Path | None = None) -> Path | None:
    """The dashscope wheel or a bare qwen.tiktoken in ``directory`` (default: the test-data dir), or None."""
    base = Path(directory) if directory is not None else default_testdata_dir()
    for name in (DASHSCOPE_WHEEL, "qwen.tiktoken"):
        if (base / name).is_file():
            return base / name
    return None


def read_qwen_tiktoken(source: str | Path) -> bytes:
    """The qwen.tiktoken bytes from the dashscope wheel or a bare file, checked against the known sha256."""
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"no Qwen vocabulary at {path} (pip download --no-deps dashscope==2.0.2)")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as wheel:
            if TIKTOKEN_MEMBER not in wheel.namelist():
                raise ValueError(f"{path} has no {TIKTOKEN_MEMBER} (expected the dashscope 2.0.2 wheel)")
            data = wheel.read(TIKTOKEN_MEMBER)
    else:
        data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != QWEN_TIKTOKEN_SHA256:
        raise ValueError(f"{path}: qwen.tiktoken sha256 {digest} is not the known {QWEN_TIKTOKEN_SHA256}")
    return data


def qwen3vl_tokenizer(source: str | Path) -> Tokenizer:
    """The Qwen3-VL base tokenizer (151,669 tokens, no Robometer tokens) from the wheel or qwen.tiktoken.

    Layout of the published tokenizer.json: NFC normalizer, the Qwen regex split then byte-level, BPE over
    the 151,643 ranks (rank = id), then the 26 Qwen3-VL special tokens in order. Takes about 2 s.
    """
    from transformers.convert_slow_tokenizer import TikTokenConverter

    data = read_qwen_tiktoken(source)
    with tempfile.TemporaryDirectory(prefix="qwen_vocab_") as tmp:
        ranks = Path(tmp) / "qwen.tiktoken"
        ranks.write_bytes(data)
        tokenizer = TikTokenConverter(vocab_file=str(ranks), pattern=QWEN_PRETOKENIZE_PATTERN).converted()
    tokenizer.normalizer = normalizers.NFC()
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size != QWEN_BPE_SIZE:
        raise ValueError(f"{source}: {size} BPE ranks, expected {QWEN_BPE_SIZE}")
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN3VL_SPECIAL_TOKENS])
    return tokenizer


def write_base_tokenizer_dir(source: str | Path, out_dir: str | Path) -> Path:
    """Write an offline stand-in for the base model's tokenizer files (tokenizer.json, config, template)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    qwen3vl_tokenizer(source).save(str(out / TOKENIZER_FILE))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "model_max_length": 262144,
        "clean_up_tokenization_spaces": False,
    }
    (out / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    (out / CHAT_TEMPLATE_FILE).write_text(qwen3vl_chat_template())
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: write the Qwen3-VL base tokenizer files into OUT_DIR."""
    parser = argparse.ArgumentParser(
        prog="python -m robometer_ros.model.qwen_vocab",
        description="Build the real Qwen3-VL tokenizer offline from the dashscope 2.0.2 wheel (qwen.tiktoken).",
    )
    parser.add_argument("out_dir", help="directory to write tokenizer.json, tokenizer_config.json, chat template")
    parser.add_argument("--source", help=f"the {DASHSCOPE_WHEEL} or a qwen.tiktoken (default: {TESTDATA_ENV} "
                        "or <venv>/share/robometer_ros_testdata)")
    args = parser.parse_args(argv)
    source = Path(args.source) if args.source else find_qwen_vocab()
    if source is None:
        print(f"error: no {DASHSCOPE_WHEEL} in {default_testdata_dir()}; run "
              f"pip download --no-deps dashscope==2.0.2 -d DIR and pass --source", file=sys.stderr)
        return 1
    try:
        out = write_base_tokenizer_dir(source, args.out_dir)
    except (FileNotFoundError, ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    size = Tokenizer.from_file(str(out / TOKENIZER_FILE)).get_vocab_size(with_added_tokens=True)
    print(f"wrote {out / TOKENIZER_FILE} ({size} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
