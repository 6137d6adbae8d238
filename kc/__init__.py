"""kc: the Knowledge Concentration training layer (taxonomy, data, specialists, teacher cache, student, evaluation)."""
