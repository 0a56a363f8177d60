"""What `report` builds: tables with intervals, paired differences, curves and plots."""
