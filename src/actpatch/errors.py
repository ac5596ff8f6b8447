"""The exceptions actpatch raises, as one small hierarchy.

Every message says what was expected, what was received, and what to do::

    ActpatchError                 base class; catch this to catch everything below
    ├── ConfigError               bad option values (layers, heads, positions, dtype, device, paths)
    ├── ModelLoadError            a model cannot be found, downloaded or converted
    ├── UnsupportedArchitectureError   no adapter knows this model's architecture
    ├── DataError                 an IOI pair or a pairs file is invalid
    │   └── PairsFileError        a line of a JSONL pairs file is invalid (carries the line number)
    ├── SiteError                 a patch site does not fit the model or the batch
    ├── NumericalError            NaN or inf in a forward pass (names the first layer that made it)
    ├── ResumeError               a saved partial sweep does not belong to this run
    └── SanityCheckError          a mandatory sanity check failed
"""

from __future__ import annotations


class ActpatchError(Exception):
    """Base class of every error raised on purpose by actpatch.

    Example::

        try:
            actpatch.run_ioi(n_pairs=0)
        except actpatch.ActpatchError as err:
            print(err)
    """


class ConfigError(ActpatchError, ValueError):
    """An option has a value actpatch cannot use.

    Example::

        try:
            actpatch.run_ioi(layers=(999,))
        except actpatch.ConfigError as err:
            print(err)  # says the valid range
    """


class ModelLoadError(ActpatchError, OSError):
    """A model or tokenizer cannot be loaded (not cached offline, bad path, bad file).

    Example::

        try:
            load_model("gpt2")
        except ModelLoadError as err:
            print(err)  # says how to get the weights
    """


class UnsupportedArchitectureError(ActpatchError, ValueError):
    """No adapter describes the model's architecture.

    Example::

        try:
            get_adapter(bert_model)
        except UnsupportedArchitectureError as err:
            print(err)  # lists the supported ones
    """


class DataError(ActpatchError, ValueError):
    """An IOI prompt pair violates what position-aligned patching needs.

    Example::

        try:
            load_pairs_file("pairs.jsonl")
        except DataError as err:
            print(err)  # names the line
    """


class PairsFileError(DataError):
    """A line of a user-supplied JSONL pairs file is invalid.

    Example::

        try:
            load_pairs_file("pairs.jsonl")
        except PairsFileError as err:
            print(err.line_no, err)
    """

    def __init__(self, path: str, line_no: int, message: str) -> None:
        self.path = path
        self.line_no = line_no
        super().__init__(f"{path}, line {line_no}: {message}")


class SiteError(ActpatchError, ValueError):
    """A patch site names a layer, head or position the model or batch does not have.

    Example::

        try:
            run_chunk(lm, batch, donor, [[HeadSite(0, 99)]])
        except SiteError as err:
            print(err)  # the valid head range
    """


class NumericalError(ActpatchError, ArithmeticError):
    """A forward pass produced NaN or inf.

    Example::

        try:
            capture(lm, batch.donor_ids, batch, [HiddenSite(0)])
        except NumericalError as err:
            print(err)  # names the first layer with NaN/inf
    """


class ResumeError(ActpatchError, ValueError):
    """``--resume`` found a checkpoint made by a different run (other model, pairs or sweep).

    Example::

        try:
            Checkpoint(path, other_fingerprint, resume=True)
        except ResumeError as err:
            print(err)
    """


class SanityCheckError(ActpatchError, RuntimeError):
    """A mandatory sanity check failed, so the numbers cannot be trusted.

    Example::

        if not result.passed:
            raise SanityCheckError(", ".join(n for n, c in result.sanity.items() if not c["passed"]))
    """
