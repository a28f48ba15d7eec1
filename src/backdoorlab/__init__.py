"""backdoorlab: backdoor attacks and defenses for image classifiers, reproducible and fast."""

__version__ = "0.1.0"
