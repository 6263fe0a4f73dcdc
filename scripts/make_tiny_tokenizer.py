"""Build the small tokenizer shipped for the ``tiny-random`` test model.

Run once from the repository root (output is committed; rerunning reproduces it byte for byte):

    python scripts/make_tiny_tokenizer.py

It trains a byte-level BPE (256 byte symbols + a few hundred merges) on the public-domain text
below, so any string round-trips and common English words become a few tokens. Special tokens
mirror SmolLM2's (``<|endoftext|>`` as BOS/EOS/UNK, ChatML ``<|im_start|>``/``<|im_end|>``) and the
chat template is ChatML, so code written against the bundled model also runs on the tiny one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# Public domain: Shakespeare (Hamlet III.i, Sonnet 18, Macbeth V.v, The Tempest IV.i) and the
# opening of the Declaration of Independence, plus plain modern sentences the tests use.
CORPUS = """\
To be, or not to be, that is the question:
Whether 'tis nobler in the mind to suffer
The slings and arrows of outrageous fortune,
Or to take arms against a sea of troubles
And by opposing end them. To die: to sleep;
No more; and by a sleep to say we end
The heart-ache and the thousand natural shocks
That flesh is heir to, 'tis a consummation
Devoutly to be wish'd. To die, to sleep;
To sleep: perchance to dream: ay, there's the rub;
For in that sleep of death what dreams may come
When we have shuffled off this mortal coil,
Must give us pause.
Shall I compare thee to a summer's day?
Thou art more lovely and more temperate:
Rough winds do shake the darling buds of May,
And summer's lease hath all too short a date:
Sometime too hot the eye of heaven shines,
And often is his gold complexion dimm'd;
And every fair from fair sometime declines,
By chance or nature's changing course untrimm'd;
But thy eternal summer shall not fade.
Tomorrow, and tomorrow, and tomorrow,
Creeps in this petty pace from day to day,
To the last syllable of recorded time;
And all our yesterdays have lighted fools
The way to dusty death. Out, out, brief candle!
Life's but a walking shadow, a poor player,
That struts and frets his hour upon the stage,
And then is heard no more. It is a tale
Told by an idiot, full of sound and fury,
Signifying nothing.
Our revels now are ended. These our actors,
As I foretold you, were all spirits and
Are melted into air, into thin air:
We are such stuff as dreams are made on,
and our little life is rounded with a sleep.
When in the Course of human events, it becomes necessary for one people to dissolve the
political bands which have connected them with another, and to assume among the powers of the
earth, the separate and equal station to which the Laws of Nature and of Nature's God entitle
them, a decent respect to the opinions of mankind requires that they should declare the causes
which impel them to the separation.
The capital of France is Paris. The weather today is sunny and warm.
Hello, world! This is a small test of the tokenizer: 0 1 2 3 4 5 6 7 8 9.
You are a helpful assistant. Please answer the question politely.
"""

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
NUM_MERGES = 300

# ChatML, as in SmolLM2-Instruct (a default system line is left out: tests pass their own).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build(out_dir: Path) -> int:
    """Train the tokenizer and save it (tokenizer.json + configs) into ``out_dir``; returns |V|."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()  # all 256 bytes: nothing is ever unknown
    trainer = trainers.BpeTrainer(
        vocab_size=len(SPECIAL_TOKENS) + len(alphabet) + NUM_MERGES,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        padding_side="left",
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    # transformers 5 writes its new class name; the generic fast class loads under 4.x and 5.x.
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return len(fast)


def main() -> None:
    default = Path(__file__).resolve().parents[1] / "attrctl" / "assets" / "tiny-tokenizer"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=default, help="output folder")
    args = parser.parse_args()
    size = build(args.out)
    print(f"wrote {args.out} (vocabulary {size})")


if __name__ == "__main__":
    main()
