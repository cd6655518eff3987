/** Starts the real `dispatcher serve` as a child process and talks to its operator and driver routes. */
import { ChildProcess, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { appendFileSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';

import { waitFor } from './ports';

export const INBOUND_SECRET = 'whsec_' + randomBytes(24).toString('base64');
export const WEBHOOK_SECRET = 'whsec_' + randomBytes(24).toString('base64');
const ADMIN_TOKEN = 'adm_test_' + randomBytes(12).toString('hex');

/** `<repo>/.venv/bin/dispatcher`, or DISPATCHER_BIN. */
export function dispatcherBin(): string {
    return process.env.DISPATCHER_BIN ?? path.resolve(__dirname, '../../../../../.venv/bin/dispatcher');
}

// Start-up runs embedded PostgreSQL, Redis and a local Ray: seconds on a quiet machine, far more on a busy one.
const STARTUP_TIMEOUT_MS = 180_000;

export interface Driver {
    driverId: string;
    token: string;
}

export class Dispatcher {
    url = '';
    postgresUrl = '';
    private child?: ChildProcess;
    private readonly dataDir = mkdtempSync(path.join(tmpdir(), 'vendure-dispatcher-'));
    output = '';
    /** Everything the dispatcher printed, kept after the test for post-mortems (gitignored). */
    readonly logFile = path.resolve(__dirname, `../../../test/__data__/dispatcher-${process.pid}.log`);

    async start(webhookUrl: string, extraEnv: Record<string, string> = {}): Promise<void> {
        const inherited = Object.fromEntries(
            Object.entries(process.env).filter(([k]) => !k.startsWith('DISPATCHER_') && !k.startsWith('RAY_')),
        );
        const env = {
            ...inherited,
            // Ray's session files and its "current cluster" lookup stay in this test's directory:
            // the dispatcher never joins another local Ray on the machine (whose shutdown would
            // take ours down), and nobody joins ours.
            RAY_TMPDIR: path.join(this.dataDir, 'ray'),
            DISPATCHER_DATA_DIR: this.dataDir,
            DISPATCHER_INBOUND_SECRET: INBOUND_SECRET,
            DISPATCHER_VENDURE_WEBHOOK_SECRET: WEBHOOK_SECRET,
            DISPATCHER_ADMIN_TOKEN: ADMIN_TOKEN,
            DISPATCHER_VENDURE_WEBHOOK_URL: webhookUrl,
            // Short retry gaps: a webhook that fails in a test is retried within seconds.
            DISPATCHER_WEBHOOK_SCHEDULE_S: '[0,1,1,2,2,3,5,5,10,10]',
            // A driver's last ping stays fresh for the whole test even on a crowded machine: these
            // tests are about Vendure, not about heartbeats.
            DISPATCHER_HEARTBEAT_TTL_S: '1800',
            ...extraEnv,
        };
        mkdirSync(env.RAY_TMPDIR, { recursive: true });
        const child = spawn(dispatcherBin(), ['serve', '--host', '127.0.0.1', '--port', '0'], {
            env,
            stdio: ['ignore', 'pipe', 'pipe'],
        });
        this.child = child;
        await new Promise<void>((resolve, reject) => {
            const timer = setTimeout(() => reject(new Error(`dispatcher did not start:\n${this.output}`)), STARTUP_TIMEOUT_MS);
            mkdirSync(path.dirname(this.logFile), { recursive: true });
            const onData = (chunk: Buffer) => {
                appendFileSync(this.logFile, chunk);
                if (this.url) return;
                this.output += chunk.toString();
                const pg = /embedded PostgreSQL: (postgresql:\/\/\S+)/.exec(this.output);
                if (pg) this.postgresUrl = pg[1];
                const up = /dispatcher listening on (http:\/\/\S+)/.exec(this.output);
                if (up && !this.url) {
                    this.url = up[1];
                    clearTimeout(timer);
                    resolve();
                }
            };
            child.stdout?.on('data', onData);
            child.stderr?.on('data', onData);
            child.on('exit', (code, signal) => {
                appendFileSync(this.logFile, `\n[test] dispatcher exited: code ${code}, signal ${signal}\n`);
                clearTimeout(timer);
                reject(new Error(`dispatcher exited with ${code}:\n${this.output}`));
            });
            child.on('error', reject);
        });
    }

    async stop(): Promise<void> {
        const child = this.child;
        if (child && child.exitCode === null) {
            const exited = new Promise(resolve => child.once('exit', resolve));
            child.kill('SIGTERM');
            const timer = setTimeout(() => child.kill('SIGKILL'), 60_000);
            await exited;
            clearTimeout(timer);
        }
        this.stopOrphanedPostgres();
        rmSync(this.dataDir, { recursive: true, force: true });
    }

    /**
     * A dispatcher that dies (e.g. its Ray was killed) can leave its embedded PostgreSQL running.
     * Stop that server by the pid in its own data directory, which this test created.
     */
    private stopOrphanedPostgres(): void {
        const pidFile = path.join(this.dataDir, 'postgres', 'postmaster.pid');
        if (!existsSync(pidFile)) return;
        const pid = Number(readFileSync(pidFile, 'utf8').split('\n')[0]);
        if (!Number.isInteger(pid) || pid <= 1) return;
        try {
            process.kill(pid, 'SIGINT'); // PostgreSQL's "fast" shutdown
        } catch {
            // already gone
        }
    }

    async call(method: string, route: string, body?: unknown, token = ADMIN_TOKEN): Promise<{ status: number; body: any }> {
        const response = await fetch(this.url + route, {
            method,
            headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
            body: body === undefined ? undefined : JSON.stringify(body),
        });
        const text = await response.text();
        return { status: response.status, body: text ? JSON.parse(text) : undefined };
    }

    private async ok(method: string, route: string, body?: unknown, token?: string): Promise<any> {
        const result = await this.call(method, route, body, token);
        if (result.status >= 300) throw new Error(`${method} ${route} → ${result.status} ${JSON.stringify(result.body)}`);
        return result.body;
    }

    /** Register a driver, make it AVAILABLE and ping its location (the driver's own token). */
    async onlineDriver(name: string, lat: number, lon: number): Promise<Driver> {
        const created = await this.ok('POST', '/drivers', { name, vehicleType: 'bike' });
        const driver = { driverId: created.driverId as string, token: created.token as string };
        await this.ok('PATCH', `/drivers/${driver.driverId}/status`, { status: 'AVAILABLE' }, driver.token);
        await this.ping(driver, lat, lon);
        // Pings are acknowledged before their zone applies them (write-behind), and a new zone
        // can take long to start on a busy machine: the driver is dispatchable once its
        // location is stored.
        await waitFor(`driver ${name} located`, async () => ((await this.driver(driver.driverId)).location ? true : undefined), STARTUP_TIMEOUT_MS);
        return driver;
    }

    ping(driver: Driver, lat: number, lon: number): Promise<unknown> {
        return this.ok('PATCH', `/drivers/${driver.driverId}/location`, { lat, lon }, driver.token);
    }

    step(driver: Driver, sellerOrderId: string, step: 'picked-up' | 'delivered' | 'failed'): Promise<any> {
        return this.ok('POST', `/deliveries/${encodeURIComponent(sellerOrderId)}/${step}`, step === 'failed' ? { reason: 'test' } : {}, driver.token);
    }

    driver(driverId: string): Promise<any> {
        return this.ok('GET', `/drivers/${driverId}`);
    }

    async delivery(sellerOrderId: string): Promise<any | undefined> {
        const result = await this.call('GET', `/deliveries/${encodeURIComponent(sellerOrderId)}`);
        return result.status === 404 ? undefined : result.body;
    }

    /** Resolves once every outgoing webhook has been delivered (the outbox is empty). */
    async outboxPending(): Promise<number> {
        const result = await this.call('GET', '/ready');
        return Number(result.body?.outboxPending ?? -1);
    }
}
