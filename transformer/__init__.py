"""Reference Transformer built on fusedlayers: the model of "Attention is all you
need" and BERT, their training, decoding, probing, and the lessons.

This folder is installed as ``fusedlayers.transformer`` (``package_dir`` in ``setup.py``); no
top-level ``transformer`` module is installed, so import it as ``fusedlayers.transformer``.

Modules, in reading order:

    model       the boxes of the paper's figure and the factories make_encoder_decoder, make_bert
    data        the synthetic language (gold POS, depth, agreement), translation pairs, vocabularies,
                a user's text file and a locally trained WordPiece/BPE tokenizer
    train       the tasks (translate, mlm, classify) and the training loop (AdamW, warm-up +
                inverse-sqrt, label smoothing, clipping, mixed precision, tqdm, DDP via torchrun)
    checkpoint  safetensors checkpoints, atomic, resumable bit-exactly
    generate    greedy and beam search with a KV cache
    probe       layer-wise linear probes, Tenney's scalar mix and expected layer
    lessons     ``fusedlayers lesson <name>``
    cli         the ``train``, ``probe`` and ``lesson`` subcommands of ``fusedlayers``

Needs the ``train`` extra (safetensors, tokenizers, tqdm, matplotlib) for training, checkpoints and
figures; the model itself needs only torch and fusedlayers.
"""

from .model import (BertEncoder, EncoderDecoder, ModelConfig, make_bert,  # noqa: F401
                    make_encoder_decoder)
