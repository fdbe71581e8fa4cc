"""torch.library ops of every kernel family (see ``_library.custom_op`` for the pattern), their
dispatch, and the backend-neutral machinery the kernels' paths share (``_recurrence``). The family
manifest (``seqgen_fast._families``) names each family's ops module."""
