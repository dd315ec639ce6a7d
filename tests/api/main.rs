mod sandbox_helpers;
mod sandbox_login;
mod sandbox_exchange;
mod sandbox_graph;
mod sandbox_control;
mod sandbox_propagation;
mod sandbox_throttling;
