//! One integration-test binary for the service (one link, one throwaway Postgres cluster).

mod cli;
mod health;
mod helpers;
mod managed_cluster;
mod migrations;
mod store_quotas;
mod store_tenancy;
