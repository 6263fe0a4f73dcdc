"""Data: corpora, prompt sets, synthesized toxic-domain text and the fine-tuning mixture.

- :mod:`attrctl.data.sources` — one policy data source → text examples with a domain
  (local files, hub datasets, bundled Shakespeare, synthesized continuations);
- :mod:`attrctl.data.shakespeare` — the bundled general-domain corpus with its fixed by-play split;
- :mod:`attrctl.data.prompt_sets` — the shipped ``toxic`` / ``neutral`` prompt sets;
- :mod:`attrctl.data.synth` — ``attrctl data synth``: sample continuations, label with oracles;
- :mod:`attrctl.data.synth_file` — the synth file's row format, settings fingerprint and reader;
- :mod:`attrctl.data.mixture` — draw sources by weight; pack tokens with per-token domain ids.

Importing this package does not import torch; the heavy parts load when used.
"""

from attrctl.data.mixture import Mixture, PackingCollator, build_mixture
from attrctl.data.prompt_sets import PromptSet, load_prompt_set
from attrctl.data.sources import Example, load_source
from attrctl.data.synth import SynthReport, synthesize
from attrctl.data.synth_file import read_rows, synth_path

__all__ = [
    "Example",
    "Mixture",
    "PackingCollator",
    "PromptSet",
    "SynthReport",
    "build_mixture",
    "load_prompt_set",
    "load_source",
    "read_rows",
    "synth_path",
    "synthesize",
]
