"""The node's settings: its listener, budgets and speech and language providers.

Part of the table (:mod:`callmesh.settings.table`), kept apart for size.
"""

from __future__ import annotations

from callmesh.settings.kinds import Choice, Number, Text, Url
from callmesh.settings.model import Setting
from callmesh.settings.node_providers_table import NODE_PROVIDER_SETTINGS
from callmesh.settings.processes import ID, NODE, PORT

_NODE = "Node"
_BUDGETS = "Node: budgets and thresholds"

NODE_SETTINGS: tuple[Setting, ...] = (
    # ------------------------------------------------------------------ node
    Setting(
        "host",
        Text(empty_ok=False),
        "127.0.0.1",
        "address to listen on",
        (NODE,),
        _NODE,
        flag="--host",
    ),
    Setting("port", PORT, 8090, "port to listen on", (NODE,), _NODE, flag="--port"),
    Setting(
        "node_id",
        ID,
        None,
        "this node's id in membership and placement",
        (NODE,),
        _NODE,
        flag="--node-id",
        default_doc="node-<8 random hex digits>",
    ),
    Setting(
        "advertise_url",
        Url(("http", "https", "ws", "wss"), empty_ok=True),
        "",
        "URL routers use to reach this node",
        (NODE,),
        _NODE,
        flag="--advertise-url",
        default_doc="http://HOST:PORT",
    ),
    Setting(
        "drain_timeout_s",
        Number(float, ge=0),
        20.0,
        "on SIGTERM, how long live calls get to reach a turn boundary and be handed off (s)",
        (NODE,),
        _NODE,
        flag="--drain-timeout",
    ),
    Setting(
        "tts_chunk_ms",
        Number(int, gt=0),
        100,
        "audio per simulated TTS chunk (ms)",
        (NODE,),
        _NODE,
        env="CALLMESH_TTS_CHUNK_MS",
    ),
    Setting(
        "sim_latency_scale",
        Number(float, ge=0),
        1.0,
        "factor on the simulated providers' latencies (0: instant)",
        (NODE,),
        _NODE,
        env="CALLMESH_SIM_LATENCY_SCALE",
    ),
    Setting(
        "tiktoken_cache_dir",
        Text(),
        "",
        "a pre-filled tiktoken cache: lets prompts be counted exactly with cl100k_base "
        "offline (tiktoken reads it too)",
        (NODE,),
        _NODE,
        env="TIKTOKEN_CACHE_DIR",
    ),
    Setting(
        "kb_dir",
        Text(),
        "",
        "directory of the tenants' knowledge bases, one subdirectory per tenant id (Markdown "
        "and YAML documents): what retrieval finds and what the offline recognizer expects "
        "callers to say; a tenant without one gets the demo knowledge base",
        (NODE,),
        _NODE,
        env="CALLMESH_KB_DIR",
        default_doc="none: every tenant gets the demo knowledge base",
    ),
    # ------------------------------------------------------------------ node budgets
    Setting(
        "stt_min_confidence",
        Number(float, ge=0, le=1),
        0.5,
        "below this STT confidence the caller is asked to repeat",
        (NODE,),
        _BUDGETS,
        env="CALLMESH_STT_MIN_CONFIDENCE",
    ),
    Setting(
        "llm_first_token_budget_ms",
        Number(float, gt=0),
        1500.0,
        "LLM first-token budget; a breach triggers the fallback (ms)",
        (NODE,),
        _BUDGETS,
        env="CALLMESH_LLM_FIRST_TOKEN_BUDGET_MS",
    ),
    Setting(
        "llm_total_budget_ms",
        Number(float, gt=0),
        8000.0,
        "LLM whole-answer budget (ms)",
        (NODE,),
        _BUDGETS,
        env="CALLMESH_LLM_TOTAL_BUDGET_MS",
    ),
    Setting(
        "tts_first_chunk_budget_ms",
        Number(float, gt=0),
        1000.0,
        "TTS first-chunk budget; a breach switches to the backup voice (ms)",
        (NODE,),
        _BUDGETS,
        env="CALLMESH_TTS_FIRST_CHUNK_BUDGET_MS",
    ),
    Setting(
        "turn_budget_ms",
        Number(float, gt=0),
        800.0,
        "a turn's end-to-end budget, end of speech to first audio (ms)",
        (NODE,),
        _BUDGETS,
        env="CALLMESH_TURN_BUDGET_MS",
    ),
    Setting(
        "overhead_budget_ms",
        Number(float, gt=0),
        5.0,
        "the share of a turn that is callmesh's own: routing, state, memory, orchestration (ms)",
        (NODE,),
        _BUDGETS,
        env="CALLMESH_OVERHEAD_BUDGET_MS",
    ),
    Setting(
        "false_interruption_ms",
        Number(int, ge=0, le=5000),
        300,
        "caller sound during a reply that yields no words for this long is a false "
        "interruption: the reply plays on, or resumes where the caller last heard it "
        "(barge_in_clear) (0: every sound is a barge-in) (ms)",
        (NODE,),
        _BUDGETS,
        env="CALLMESH_FALSE_INTERRUPTION_MS",
    ),
    Setting(
        "barge_in_clear",
        Choice(("on_words", "at_sound")),
        "on_words",
        "when caller sound clears the reply: on_words (once the sound yields words; noise "
        "never stops it) or at_sound (at once; a sound that yields no words within "
        "false_interruption_ms resumes the reply from the first sentence the caller had "
        "not heard)",
        (NODE,),
        _BUDGETS,
        env="CALLMESH_BARGE_IN_CLEAR",
    ),
    *NODE_PROVIDER_SETTINGS,
)
