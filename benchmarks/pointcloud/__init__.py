"""Point-cloud classification: RECM against VN, ES and RPP, and the generating-set study."""
