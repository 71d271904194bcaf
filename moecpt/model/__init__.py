"""moecpt.model: the decoder (:mod:`.transformer`), RoPE (:mod:`.rope`), latent attention (:mod:`.mla`), the MoE
layer (:mod:`.moe`, :mod:`.expert_dispatch`, :mod:`.glu`), routers and balancing strategies (:mod:`.routing`) and
FLOP counts (:mod:`.flops`).

Shape legend. Tensor names end in one capital letter per dimension (``x_BTD`` is ``[batch, tokens, d_model]``);
a letter means the same thing in every file of this package:

==========  =======================================================================================================
B           batch (sequences)
T           tokens: sequence positions in the decoder; in the MoE layer and routers the flattened ``B * T`` tokens
D           ``d_model``, the residual-stream width
V           vocabulary
H           query heads; G key/value heads (grouped-query attention: ``H / G`` query heads share one); A head dim
R           rotary dims of a head (``R <= A``; partial rotary when smaller; MLA: ``qk_rope_head_dim``)
L, C        multi-head latent attention: the query latent (``q_lora_rank``) and the key/value latent
            (``kv_lora_rank``); there A = U + R is the query/key head dim, U its un-rotated part
            (``qk_nope_head_dim``), M the value head dim (``v_head_dim``)
E           routed experts
K           routed slots per token (top-k)
S           routed slots, ``T * K``, in token order (slot ``t * K + k``)
F           an expert's (or dense FFN's) hidden width; W = ``2F``, the stacked ``[gate | up]`` width of a GLU
N           rows of any flat batch (kept slots in dispatch, rows of a GLU input)
P           rows of the expert-sorted dispatch layout (padded runs included); Q = ``P``, plus one zero row when
            slots are dropped
I, O        input and output features of one expert matmul
==========  =======================================================================================================

A digit is a literal size (``gate_P1`` is ``[P, 1]``, ``cos_T1R`` is ``[T, 1, R]``).
"""
