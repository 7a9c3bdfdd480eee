"""Audio every process shares: formats and their frame arithmetic (:mod:`.format`), the
G.711 mu-law codec and resampling (:mod:`.codec`), and the simulated speech signal that
carries text in tones (:mod:`.tones`).

This ``__init__`` imports nothing, so the wire protocol can use :mod:`.format` without
loading numpy.
"""
