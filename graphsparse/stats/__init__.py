"""Statistics: one calibration pass over the data (``calibrate``) fills each operator's per-channel mean and
variance (``moments``, exact under ``torch.distributed``) and, for plots, its histograms (``histograms``); what a
pass has accumulated is its state (``calibration_state``: resumed from a file, merged across ranks).

May import: :mod:`graphsparse.artifact`, :mod:`graphsparse.planning`, :mod:`graphsparse.graph`,
:mod:`graphsparse.ops` and the shared top-level modules; never :mod:`graphsparse.robust`.
"""
