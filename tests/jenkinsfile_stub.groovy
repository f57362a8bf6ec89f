// A small stand-in for Jenkins' pipeline engine, enough to run a declarative Jenkinsfile
// the way the controller would, without one (tests/test_jenkinsfile.py):
//
//   groovy tests/jenkinsfile_stub.groovy JENKINSFILE SOURCE ROOT TRACE [EXECUTE_REGEX]
//
// SOURCE is the repository `checkout scm` gives each workspace (its entries linked in),
// ROOT a scratch directory for the workspaces and stashes, TRACE a JSON-lines file of the
// steps as they ran. Parameters take their declared defaults, overridden by environment
// variables of the same name (as "Build with Parameters" does); Jenkins exports them
// to the shell as strings. Each node() gets a workspace of its own, so only stash/unstash
// carries files between them. sh runs `sh -xe` like Jenkins; an sh script matching
// EXECUTE_REGEX (default: all) runs, others are only traced (exit 0, empty stdout).
// `make` scripts run as `make -n` (dry run): setting up the machine is not this test's.
// Parallel branches run one after another (they are independent: own workspaces).

import groovy.io.FileType
import groovy.json.JsonOutput
import java.nio.file.FileSystems
import java.nio.file.Files
import java.nio.file.Path
import java.nio.file.Paths
import org.codehaus.groovy.control.CompilerConfiguration

class StubError extends RuntimeException {
    StubError(String m) { super(m) }
}

class Env {
    private final PipelineStub p
    Env(PipelineStub p) { this.p = p }
    Object getProperty(String name) { return p.currentEnv()[name] }
    void setProperty(String name, Object value) { p.globalEnv[name] = value?.toString() }
}

abstract class PipelineStub extends Script {
    static String source, root, tracePath, executeRegex
    Map<String, String> globalEnv = new LinkedHashMap<>(System.getenv())
    List<Map<String, String>> envStack = []
    Map<String, Object> params = [:]
    Map<String, Object> decl = [stages: [], params: [], options: []]
    boolean collecting = false
    String cwd
    int workspaces = 0
    String result = 'SUCCESS'
    List<String> stageStack = []

    static final List<String> LEVELS = ['SUCCESS', 'UNSTABLE', 'FAILURE']

    Map<String, String> currentEnv() {
        Map<String, String> e = new LinkedHashMap<>(globalEnv)
        envStack.each { e.putAll(it) }
        return e
    }

    void trace(Map entry) {
        entry.stage = stageStack ? stageStack[-1] : null
        entry.cwd = cwd
        new File(tracePath) << JsonOutput.toJson(entry) + '\n'
    }

    void worsen(String level) {
        if (LEVELS.indexOf(level) > LEVELS.indexOf(result)) { result = level }
    }

    Env getEnv() { return new Env(this) }
    Map getParams() { return params }
    String getScm() { return 'scm' }
    String getAny() { return 'any' }

    String newWorkspace(String label) {
        String ws = "${root}/ws${workspaces++}"
        new File(ws).mkdirs()
        trace(step: 'node', label: label, workspace: ws)
        return ws
    }

    // -- the declarative sections: recorded while collecting, then run in order ---------
    void pipeline(Closure body) {
        collecting = true
        body()
        collecting = false
        (decl.params as List<Map>).each { Map p ->
            String given = System.getenv(p.name as String)
            Object value = given == null ? p.defaultValue : (p.type == 'boolean' ? given == 'true' : given)
            params[p.name as String] = value
            globalEnv[p.name as String] = value.toString()
        }
        globalEnv.putAll(decl.environment as Map ?: [:])
        trace(step: 'pipeline', agent: decl.agent, options: decl.options, params: params)
        cwd = newWorkspace(decl.agent as String)
        globalEnv.NODE_NAME = 'agent0'
        globalEnv.WORKSPACE = cwd
        if (!('skipDefaultCheckout' in decl.options)) { checkout(scm) }
        boolean failed = false
        for (Map stage in (decl.stages as List<Map>)) {
            if (failed) { trace(step: 'stage-skipped', name: stage.name); continue }
            stageStack << (stage.name as String)
            trace(step: 'stage', name: stage.name)
            try {
                (stage.body as Closure)()
            } catch (StubError e) {
                trace(step: 'error', message: e.message)
                worsen('FAILURE')
                failed = true
            }
            stageStack.pop()
        }
        stageStack << 'post'
        if (decl.post) { (decl.post as Closure)() }
        stageStack.pop()
        trace(step: 'result', result: result)
    }

    void agent(Object spec) { decl.agent = spec }
    void agent(Closure c) { c() }
    void label(String l) { decl.agent = "label:${l}" }
    void parameters(Closure c) { c() }
    void string(Map m) { decl.params << [type: 'string'] + m }
    void booleanParam(Map m) { decl.params << [type: 'boolean'] + m }
    void options(Closure c) { c() }
    void timestamps() { decl.options << 'timestamps' }
    void skipDefaultCheckout() { decl.options << 'skipDefaultCheckout' }
    Map logRotator(Map m) { return [logRotator: m] }
    void buildDiscarder(Object d) { decl.options << [buildDiscarder: d] }
    void environment(Closure c) {
        Map<String, String> vars = [:]
        c.resolveStrategy = Closure.DELEGATE_FIRST
        c.delegate = vars
        c()
        decl.environment = vars
    }
    void stages(Closure c) { c() }
    void stage(String name, Closure body) {
        if (!collecting) { throw new StubError("stage('${name}') outside stages {}") }
        decl.stages << [name: name, body: body]
    }
    void steps(Closure c) { c() }
    void script(Closure c) { c() }
    void post(Closure c) { decl.post = c }
    void always(Closure c) { c() }
    void success(Closure c) { if (result == 'SUCCESS') { c() } }
    void unstable(Closure c) { if (result == 'UNSTABLE') { c() } }
    void failure(Closure c) { if (result == 'FAILURE') { c() } }

    Object timeout(Map m, Closure c = null) {
        if (c == null) { decl.options << [timeout: m]; return null }
        return c()
    }

    // -- steps -------------------------------------------------------------------------
    Object sh(String script) { return sh(script: script) }

    Object sh(Map m) {
        String script = m.script
        boolean run = executeRegex == null || script =~ executeRegex
        Map<String, String> env = currentEnv()
        Map entry = [step: 'sh', label: m.label, script: script, run: run,
                     env: env.findAll { k, v -> k.startsWith('KPT_') || params.containsKey(k) }]
        int rc = 0
        String out = ''
        if (run) {
            File file = File.createTempFile('script', '.sh', new File(root))
            file.text = script.trim().startsWith('make ') ? script.replaceFirst(/make /, 'make -n ') : script
            ProcessBuilder pb = new ProcessBuilder('sh', '-xe', file.path).directory(new File(cwd))
            pb.environment().clear()
            pb.environment().putAll(env)
            if (!m.returnStdout) { pb.redirectOutput(ProcessBuilder.Redirect.INHERIT) }
            pb.redirectError(ProcessBuilder.Redirect.INHERIT)
            Process proc = pb.start()
            if (m.returnStdout) { out = proc.inputStream.text }
            rc = proc.waitFor()
            file.delete()
        }
        entry.rc = rc
        trace(entry)
        if (m.returnStatus) { return rc }
        if (rc != 0) { throw new StubError("script returned exit code ${rc}") }
        return m.returnStdout ? out : null
    }

    Object withEnv(List<String> vars, Closure c) {
        envStack << vars.collectEntries { String v -> int i = v.indexOf('='); [(v.substring(0, i)): v.substring(i + 1)] }
        try { return c() } finally { envStack.pop() }
    }

    Object node(String label, Closure c) {
        String saved = cwd
        cwd = newWorkspace("label:${label}")
        envStack << [NODE_NAME: "agent${workspaces - 1}".toString(), WORKSPACE: cwd]
        try { return c() } finally { cwd = saved; envStack.pop() }
    }

    Object lock(Map m, Closure c) {
        trace(step: 'lock', resource: m.resource)
        try { return c() } finally { trace(step: 'unlock', resource: m.resource) }
    }

    Object dir(String d, Closure c) {
        String saved = cwd
        cwd = new File(cwd, d).path
        new File(cwd).mkdirs()
        try { return c() } finally { cwd = saved }
    }

    void deleteDir() {
        if (!new File(cwd).canonicalPath.startsWith(new File(root).canonicalPath + '/')) {
            throw new StubError("deleteDir outside the stub's workspaces: ${cwd}")
        }
        new File(cwd).deleteDir()
        trace(step: 'deleteDir')
    }

    void checkout(Object what) {
        new File(source).eachFile { File f ->
            Path link = Paths.get(cwd, f.name)
            if (f.name != 'out' && !Files.exists(link)) { Files.createSymbolicLink(link, f.toPath()) }
        }
        trace(step: 'checkout')
    }

    List<String> matching(String base, String includes, String excludes) {
        // Ant patterns: `**/` also matches no directory at all (java's glob needs one)
        Closure matchers = { String patterns ->
            (patterns ?: '').split(',')*.trim().findAll { it }.collectMany { String g ->
                (g.startsWith('**/') ? [g, g.substring(3)] : [g]).collect { FileSystems.default.getPathMatcher("glob:${it}") }
            }
        }
        List inc = matchers(includes)
        List exc = matchers(excludes)
        Path top = Paths.get(base)
        List<String> found = []
        if (!Files.isDirectory(top)) { return found }
        top.toFile().eachFileRecurse(FileType.FILES) { File f ->
            Path rel = top.relativize(f.toPath())
            if (inc.any { it.matches(rel) } && !exc.any { it.matches(rel) }) { found << rel.toString() }
        }
        return found.sort()
    }

    void stash(Map m) {
        List<String> files = matching(cwd, m.includes as String, m.excludes as String)
        if (!files && !m.allowEmpty) { throw new StubError("stash ${m.name}: no files") }
        Files.createDirectories(Paths.get(root, 'stash', m.name as String))
        files.each { String f ->
            Path to = Paths.get(root, 'stash', m.name as String, f)
            Files.createDirectories(to.parent)
            Files.copy(Paths.get(cwd, f), to)
        }
        trace(step: 'stash', name: m.name, files: files.size())
    }

    void unstash(String name) {
        Path from = Paths.get(root, 'stash', name)
        if (!Files.isDirectory(from)) { throw new StubError("no such saved stash '${name}'") }
        List<String> files = matching(from.toString(), '**', null)
        files.each { String f ->
            Path to = Paths.get(cwd, f)
            Files.createDirectories(to.parent)
            Files.copy(from.resolve(f), to)
        }
        trace(step: 'unstash', name: name, files: files.size())
    }

    void parallel(Map branches) {
        Map cells = new LinkedHashMap(branches)
        cells.remove('failFast')
        StubError first = null
        cells.each { String name, Closure c ->
            stageStack << name
            trace(step: 'parallel-branch', name: name)
            try { c() } catch (StubError e) { first = first ?: e; trace(step: 'error', message: e.message) }
            stageStack.pop()
        }
        if (first) { throw first }
    }

    void catchError(Map m, Closure c) {
        try {
            c()
        } catch (StubError e) {
            trace(step: 'catchError', message: m.message, buildResult: m.buildResult)
            worsen((m.buildResult ?: 'FAILURE') as String)
        }
    }

    void error(String message) { throw new StubError(message) }
    void unstable(String message) { worsen('UNSTABLE'); trace(step: 'unstable', message: message) }
    void echo(String message) { trace(step: 'echo', message: message) }

    void junit(Map m) {
        boolean there = new File(cwd, m.testResults as String).isFile()
        if (!there && !m.allowEmptyResults) { throw new StubError("junit: no ${m.testResults}") }
        trace(step: 'junit', testResults: m.testResults, found: there, keepProperties: m.keepProperties)
    }

    void archiveArtifacts(Map m) {
        List<String> files = matching(cwd, m.artifacts as String, m.excludes as String)
        trace(step: 'archiveArtifacts', files: files)
    }

    void publishHTML(Map m) {
        Map t = m.target as Map
        List<String> files = matching(new File(cwd, t.reportDir as String).path, t.includes as String ?: '**', null)
        trace(step: 'publishHTML', reportDir: t.reportDir, reportFiles: t.reportFiles, files: files)
    }
}

PipelineStub.source = args[1]
PipelineStub.root = args[2]
PipelineStub.tracePath = args[3]
PipelineStub.executeRegex = args.length > 4 ? args[4] : null
CompilerConfiguration cc = new CompilerConfiguration()
cc.scriptBaseClass = PipelineStub.name
new GroovyShell(this.class.classLoader, new Binding(), cc).evaluate(new File(args[0]))
