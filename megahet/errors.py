"""Expected user errors: one line naming the problem and the fix, printed without a traceback."""


class MegahetError(RuntimeError):
    """A problem with the user's input (config, data, checkpoint, cluster) that they can fix.

    Entry points catch it, log the one-line message and exit non-zero without a traceback.
    """
