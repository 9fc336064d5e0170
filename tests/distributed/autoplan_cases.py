"""Rank functions for auto-planning's link measurement inside spawned (daemonic) ranks."""
import logging


def links_in_a_daemonic_rank():
    """load_or_measure_links as a test's spawned rank meets it: (figures, warnings logged)."""
    from megahet.hetero.profile import load_or_measure_links
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger("megahet")
    logger.addHandler(Keep())
    return load_or_measure_links(2, 1), records
