"""Quality measurement: FID, pixel metrics, bootstrap statistics, plots."""
