"""Error types. Each names the file, tensor or field at fault; the CLI maps every one to exit code 2. And
Terminated, the interrupt that SIGTERM raises."""


class FlashMoeError(Exception):
    """Base class: a problem the user can act on (bad input, missing file, budget too small)."""


class ConfigError(FlashMoeError):
    """config.json is missing a required field, has an unknown model_type, or an inconsistent value."""


class CheckpointError(FlashMoeError):
    """A source checkpoint is unreadable: missing/truncated shard, missing tensor, wrong shape or dtype."""


class FormatError(FlashMoeError):
    """A flashmoe model directory fails validation (manifest, sizes, offsets, checksums)."""


class MemoryBudgetError(FlashMoeError):
    """The requested --max-memory cannot hold what must stay resident."""


class ConformanceError(FlashMoeError):
    """A backend failed the conformance suite and will not be used."""


class TextError(FlashMoeError):
    """A prompt is not valid UTF-8 text: it holds a lone surrogate (an undecodable byte of a file or argument,
    or a JSON escape such as \\ud800)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (`timeout`, `kill`, a service manager), raised by the command line's handler as an interrupt so
    that Ctrl-C's cleanup runs (partial outputs removed, a generation in progress stopped as cancelled). Unlike
    Ctrl-C it ends the command, with exit code 143: what catches KeyboardInterrupt to go on (the chat's prompt
    and reply, generate keeping the statistics and trace of an interrupted run) re-raises it first."""
