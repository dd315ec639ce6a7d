mod sandbox_helpers;
mod sandbox_login;
mod sandbox_exchange;
mod sandbox_graph;
