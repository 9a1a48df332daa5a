// pgJDBC (the PostgreSQL JDBC driver) through pgswitch in transaction mode, run by
// tests/transaction_mode.rs: many connections over few servers, server-side prepared statements
// (prepareThreshold), metadata of a statement before it ever ran (a Describe of a statement
// not yet on the server: what breaks getMetaData() on other poolers), batches, a cursor
// fetched in pieces inside a transaction (Execute with a row limit), a 3 MB parameter, and an
// error in between. Prints one summary line; exits 1 when any connection saw an error.
//
//   java -cp postgresql.jar:. JdbcProbe HOST PORT DATABASE USER PASSWORD PREPARE_THRESHOLD CLIENTS

import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.ParameterMetaData;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.ResultSetMetaData;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.Collections;
import java.util.List;
import java.util.Properties;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;

public class JdbcProbe {
    static final int ROWS = 250;

    public static void main(String[] args) throws Exception {
        String url = "jdbc:postgresql://" + args[0] + ":" + args[1] + "/" + args[2]
                + "?prepareThreshold=" + args[5];
        Properties login = new Properties();
        login.setProperty("user", args[3]);
        login.setProperty("password", args[4]);
        int clients = Integer.parseInt(args[6]);
        try (Connection c = DriverManager.getConnection(url, login);
                Statement s = c.createStatement()) {
            s.execute("DROP TABLE IF EXISTS jdbc_probe");
            s.execute("CREATE TABLE jdbc_probe (k int PRIMARY KEY, v text, b bytea)");
        }
        List<String> errors = Collections.synchronizedList(new ArrayList<>());
        ExecutorService pool = Executors.newFixedThreadPool(clients);
        List<Future<?>> running = new ArrayList<>();
        for (int t = 0; t < clients; t++) {
            final int id = t;
            running.add(pool.submit(() -> {
                try (Connection c = DriverManager.getConnection(url, login)) {
                    client(c, id);
                } catch (Exception e) {
                    errors.add("connection " + id + ": " + e);
                }
            }));
        }
        for (Future<?> f : running) {
            f.get();
        }
        pool.shutdown();
        long rows;
        try (Connection c = DriverManager.getConnection(url, login);
                Statement s = c.createStatement();
                ResultSet rs = s.executeQuery("SELECT count(*) FROM jdbc_probe")) {
            rs.next();
            rows = rs.getLong(1);
        }
        System.out.println("jdbc: prepareThreshold " + args[5] + ", " + clients + " connections, "
                + rows + " rows (expected " + (long) clients * ROWS + "), " + errors.size() + " errors");
        for (String e : errors.subList(0, Math.min(10, errors.size()))) {
            System.out.println(e);
        }
        System.exit(errors.isEmpty() && rows == (long) clients * ROWS ? 0 : 1);
    }

    static void check(boolean ok, String what) {
        if (!ok) {
            throw new IllegalStateException(what);
        }
    }

    static void client(Connection c, int id) throws SQLException {
        int base = id * 100000;
        PreparedStatement select = c.prepareStatement("SELECT k, v FROM jdbc_probe WHERE k = ?");
        // Metadata before the statement ever ran.
        ResultSetMetaData md = select.getMetaData();
        check(md.getColumnCount() == 2 && md.getColumnName(2).equals("v"), "result metadata");
        ParameterMetaData pm = select.getParameterMetaData();
        check(pm.getParameterCount() == 1, "parameter metadata");

        PreparedStatement insert = c.prepareStatement("INSERT INTO jdbc_probe (k, v) VALUES (?, ?)");
        for (int i = 0; i < 50; i++) {
            insert.setInt(1, base + i);
            insert.setString(2, "v" + i);
            check(insert.executeUpdate() == 1, "insert");
            select.setInt(1, base + i);
            try (ResultSet rs = select.executeQuery()) {
                check(rs.next() && rs.getString(2).equals("v" + i), "read back " + i);
            }
        }
        for (int i = 50; i < ROWS; i++) {
            insert.setInt(1, base + i);
            insert.setString(2, "b" + i);
            insert.addBatch();
        }
        insert.executeBatch();

        // A cursor fetched 7 rows at a time keeps its server until COMMIT.
        c.setAutoCommit(false);
        PreparedStatement range = c.prepareStatement(
                "SELECT k FROM jdbc_probe WHERE k >= ? AND k < ? ORDER BY k");
        range.setFetchSize(7);
        range.setInt(1, base);
        range.setInt(2, base + 100000);
        int n = 0;
        try (ResultSet rs = range.executeQuery()) {
            while (rs.next()) {
                check(rs.getInt(1) == base + n, "row order");
                n++;
            }
        }
        check(n == ROWS, "cursor rows " + n);
        byte[] data = new byte[3 * 1024 * 1024 + id];
        Arrays.fill(data, (byte) 7);
        PreparedStatement big = c.prepareStatement("UPDATE jdbc_probe SET b = ? WHERE k = ?");
        big.setBytes(1, data);
        big.setInt(2, base);
        check(big.executeUpdate() == 1, "3 MB update");
        c.commit();
        c.setAutoCommit(true);

        PreparedStatement length = c.prepareStatement(
                "SELECT length(b), b = decode(repeat('07', ?), 'hex') FROM jdbc_probe WHERE k = ?");
        length.setInt(1, data.length);
        length.setInt(2, base);
        try (ResultSet rs = length.executeQuery()) {
            check(rs.next() && rs.getInt(1) == data.length && rs.getBoolean(2), "3 MB read back");
        }
        try (Statement s = c.createStatement()) {
            s.execute("SELECT 1/0");
            check(false, "division by zero succeeded");
        } catch (SQLException e) {
            check("22012".equals(e.getSQLState()), "SQLSTATE " + e.getSQLState());
        }
        for (int i = 0; i < 20; i++) {
            select.setInt(1, base + i);
            try (ResultSet rs = select.executeQuery()) {
                check(rs.next(), "after the error " + i);
            }
        }
    }
}
