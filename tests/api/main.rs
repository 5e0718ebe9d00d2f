//! One integration-test binary for the service (one link, one throwaway Postgres cluster).

mod cli;
mod health;
mod helpers;
mod managed_cluster;
mod migrations;
mod service_adapters;
mod service_admin;
mod service_helpers;
mod service_openai;
mod service_quotas;
mod service_stream;
mod store_quotas;
mod store_tenancy;
mod tiny_model;
