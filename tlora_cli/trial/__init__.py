"""`tlora trial`: which start and which learning rate win on the user's own data, measured by short fine-tunes of
every chosen method at a few rates, on the same batches, scored on a held-out split carved from --data."""
