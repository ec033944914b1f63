//! Seats: activating a license on a machine (its fingerprint) and
//! releasing the seat again.

use chrono::{DateTime, Utc};

use super::SqlStore;
use super::conn::{Command, Conn, Ending, Step, args};
use super::load::{Lock, require_license};
use super::tx::{NewEvent, finish_recorded};
use crate::domain::rules::{self, ActivateDecision};
use crate::domain::{Activation, License, LicenseKey};
use crate::store::change_notify::Change;
use crate::store::{Actor, StoreResult, micros};

/// ActivateLicense: takes a seat for `fingerprint`, or finds it taken by it.
pub(super) struct Activate {
    pub key: LicenseKey,
    pub fingerprint: String,
    pub hostname: String,
    pub client_version: String,
    pub actor: Actor,
    pub now: DateTime<Utc>,
}

impl Command for Activate {
    type Output = (License, Activation);

    async fn run<C: Conn>(&self, conn: &mut C) -> StoreResult<Ending<Self::Output>> {
        let (id, mut license) = require_license(conn, &self.key, Lock::ForUpdate).await?;
        let fingerprint = self.fingerprint.as_str();
        match rules::activate(&license, fingerprint, self.now)? {
            ActivateDecision::AlreadyActivated => {
                let activation = license
                    .activations
                    .iter()
                    .find(|a| a.fingerprint == fingerprint)
                    .cloned()
                    .expect("decided on this list");
                Ok(Ending::Commit((license, activation)))
            }
            ActivateDecision::TakeSeat => {
                let insert: Step = (
                    "INSERT INTO activations (license_id, fingerprint, hostname, client_version, activated_at) \
                     VALUES ($1, $2, $3, $4, $5)",
                    args![
                        id,
                        fingerprint,
                        &self.hostname,
                        &self.client_version,
                        micros(self.now)
                    ],
                );
                let event = NewEvent {
                    event_type: "activated",
                    fingerprint,
                    detail: &self.hostname,
                    ..Default::default()
                };
                // The answer is the license as loaded plus this seat: the
                // row was locked, and the trigger counts exactly this insert.
                let activation = Activation {
                    fingerprint: self.fingerprint.clone(),
                    hostname: self.hostname.clone(),
                    activated_at: self.now,
                };
                license.seats_used += 1;
                license.activations.push(activation.clone());
                let ending = Ending::Commit((license, activation));
                finish_recorded(conn, &[insert], id, &self.actor, self.now, event, ending).await
            }
        }
    }
}

/// DeactivateLicense: releases the seat `fingerprint` holds.
pub(super) struct Deactivate {
    pub key: LicenseKey,
    pub fingerprint: String,
    pub actor: Actor,
    pub now: DateTime<Utc>,
}

impl Command for Deactivate {
    type Output = License;

    async fn run<C: Conn>(&self, conn: &mut C) -> StoreResult<Ending<License>> {
        let (id, mut license) = require_license(conn, &self.key, Lock::ForUpdate).await?;
        let fingerprint = self.fingerprint.as_str();
        rules::deactivate(&license, fingerprint)?;
        let delete: Step = (
            "DELETE FROM activations WHERE license_id = $1 AND fingerprint = $2",
            args![id, fingerprint],
        );
        let event = NewEvent {
            event_type: "deactivated",
            fingerprint,
            ..Default::default()
        };
        // As loaded (the row was locked) minus this seat.
        license.seats_used -= 1;
        license.activations.retain(|a| a.fingerprint != fingerprint);
        let ending = Ending::Commit(license);
        finish_recorded(conn, &[delete], id, &self.actor, self.now, event, ending).await
    }
}

impl SqlStore {
    pub(super) async fn activate(
        &self,
        key: &LicenseKey,
        fingerprint: &str,
        hostname: &str,
        client_version: &str,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> StoreResult<(License, Activation)> {
        let cmd = Activate {
            key: key.clone(),
            fingerprint: fingerprint.to_string(),
            hostname: hostname.to_string(),
            client_version: client_version.to_string(),
            actor: actor.clone(),
            now,
        };
        self.write(Some(Change::License(key.clone())), cmd).await
    }

    pub(super) async fn deactivate(
        &self,
        key: &LicenseKey,
        fingerprint: &str,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> StoreResult<License> {
        let cmd = Deactivate {
            key: key.clone(),
            fingerprint: fingerprint.to_string(),
            actor: actor.clone(),
            now,
        };
        self.write(Some(Change::License(key.clone())), cmd).await
    }
}
