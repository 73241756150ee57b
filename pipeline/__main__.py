"""``python -m pipeline`` runs the sweep (same as ``minratio-sweep``)."""
from pipeline.orchestration.cli import main

if __name__ == "__main__":
    main()
