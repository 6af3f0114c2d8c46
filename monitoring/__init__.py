"""Drift monitoring of the hard-sample fraction.

- ``table``: the day's monitoring frame and its summary, from the lake and the champion;
- ``reports``: the Evidently report of a day against its reference, the workspace snapshot, HTML;
- ``dashboards``: the workspace project's panels, defined in code;
- ``daily``: ``monitor_day(cfg, date) -> MonitorReport``, with the alerts of ``params.yaml``.

The library ``hap`` may import this package (the CLI does); it never imports ``flows``.
"""
