"""The symmetry-gap sweep: RECM's alpha against an estimated bound on the data's symmetry gap."""
