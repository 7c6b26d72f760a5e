"""Lossless speed: a cheap draft proposes k tokens, the model verifies them in one forward.

    draft.py     Drafter protocol; PromptLookupDrafter (n-grams of the sequence so far);
                 SelfDrafter (the same model object with a cheaper plan's modules swapped in)
    verify.py    the acceptance rules: greedy (longest matching prefix) and sampling
                 (accept with min(1, p/q), else resample from norm(max(0, p - q)))
    generate.py  speculative_generate(): the loop, one KV cache per side, rejected positions cropped
    install.py   execution.speculative: the generate wrapper the executor installs
    classes.py   per-query-class plans: speculation only, routed by the request's class label
    classcontrol.py  their apply / rollback / status reports, for agent/control.py
    perrequest.py    each request's speculation figures, for its telemetry record
"""
from headroom_sidecar.agent.executor.speculative.draft import (Drafter, PromptLookupDrafter, Proposal,  # noqa: F401
                                     SelfDrafter)
from headroom_sidecar.agent.executor.speculative.generate import SpecStats, speculative_generate  # noqa: F401
from headroom_sidecar.agent.executor.speculative.verify import Sampler  # noqa: F401
