"""``python -m pipeline`` runs the sweep (same as ``minratio-sweep``)."""
from pipeline.cli import sweep_main

if __name__ == "__main__":
    sweep_main()
