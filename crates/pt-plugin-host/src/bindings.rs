//! Host bindings for `pt:plugin@0.2.0` (`wit/since_v0.2.0`): the frozen
//! `0.1.0` interfaces it builds on, and its `tasks` export.

wasmtime::component::bindgen!({
    path: "../../wit/since_v0.2.0",
    world: "any-plugin",
});
