"""The universal proposal network (UPN) of ChatRex: class-agnostic boxes at two granularities."""
