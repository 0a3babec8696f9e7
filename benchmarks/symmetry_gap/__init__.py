"""The symmetry-gap sweep: RECM's alpha against a certified bound on the data's symmetry gap."""
