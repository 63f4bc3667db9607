"""robometer_ros.model: the Robometer model and everything around it.

Modules (import them directly; this package import pulls in no torch):

* ``config``     RobometerConfig, tiny / mid / 4B-shaped factories, special-token order (pure Python).
* ``robometer``  RobometerModel on transformers' Qwen3VLModel: ``encode_frame``, ``forward_language``,
                 the reference ``forward`` (torch).
* ``heads``      the three heads, ``expected_progress`` and ``two_hot`` (torch).
* ``progress``   C51 decode / two-hot / sigmoid in numpy (for torch-free runtimes).
* ``prompt``     prompt text, token layout and M-RoPE ids on the host (numpy + tokenizers).
* ``tokenizer``  BPE tokenizer factory, tokenizer files, the Qwen3-VL chat template (tokenizers).
* ``checkpoint`` load / save in the released RBM / RFM safetensors layout (torch).
* ``tiny``       small random-weight models and tokenizers for tests and benchmarks (torch).
"""
