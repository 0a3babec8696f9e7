"""Whether pruning on exactly symmetric data holds for every reasonable learning rate (see ``run``)."""
