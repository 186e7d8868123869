"""The fastlora command line (placeholder until the demo lands)."""


def main(argv=None) -> int:
    return 0
